from neuromap.cli import main

raise SystemExit(main())
