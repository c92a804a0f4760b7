"""`python -m signround` is the `signround` command."""

from signround.cli import main

if __name__ == "__main__":
    main()
