from zep.cli import main

raise SystemExit(main())
