"""madpo's command line. `python cli.py fit -c configs/tiny/madpo.yaml`, `python cli.py pipeline -c ...`; see README."""

from madpo.cli import main

if __name__ == "__main__":
    main()
