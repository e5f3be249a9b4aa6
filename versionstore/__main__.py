from versionstore.cli import main

raise SystemExit(main())
