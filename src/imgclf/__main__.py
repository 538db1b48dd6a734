"""`python -m imgclf` (also what `torchrun -m imgclf` runs)."""

from imgclf.cli import main

raise SystemExit(main())
