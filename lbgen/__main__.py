"""``python -m lbgen ...`` is the ``lbgen`` command."""

from lbgen.commands import main

if __name__ == "__main__":
    main()
