"""``python -m divebench`` (what torchrun launches with ``-m divebench``)."""

from divebench.cli import main

if __name__ == "__main__":
    main(prog_name="divebench")
