"""The `jaxkit` console command (pyproject's entry point, and
`python -m jaxkit.cli`); the commands live in jaxkit.run.cli."""
from jaxkit.run.cli import main

if __name__ == "__main__":
    main()
