from moemla.cli import main

raise SystemExit(main())
