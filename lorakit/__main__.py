"""`python -m lorakit` runs the same CLI as the `lorakit` console script."""

from lorakit.cli import main

if __name__ == "__main__":
    main()
