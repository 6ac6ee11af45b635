from mesh_gateway.cli import main

raise SystemExit(main())
