from snapfs.cli.main import main

raise SystemExit(main())
