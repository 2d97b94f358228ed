"""``python -m pdkit`` = the ``pdkit`` command, for installs without console scripts (``pip --target``)."""

from pdkit.cli import main

if __name__ == "__main__":
    main()
