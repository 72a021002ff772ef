import sys

from .sweep import main

if __name__ == "__main__":
    sys.exit(main())
