from versionstore.launch import main

raise SystemExit(main())
