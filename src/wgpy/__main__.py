from wgpy.cli import main

raise SystemExit(main())
