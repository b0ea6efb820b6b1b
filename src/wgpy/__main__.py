from wgpy.control.cli import main

raise SystemExit(main())
