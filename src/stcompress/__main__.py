from stcompress.cli import main

raise SystemExit(main())
