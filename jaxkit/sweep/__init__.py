"""Sweeps: many training runs of one base config (a grid of overrides, sets
of overrides, seeds), run one after another or one per GPU side by side,
and a report of their results.

    plan     a sweep file read, checked and expanded into its runs
    runner   the runs as `jaxkit train` subprocesses; dry-run plan, shell
             commands, SLURM array script
    parallel the runs side by side, one per GPU, init_from chains in order
    report   final metrics of runs: the table (Markdown, CSV) over seeds
    plots    loss curves and a metric against a knob (matplotlib, optional)

The commands are `jaxkit sweep` and `jaxkit report` (jaxkit.run.sweep).
Nothing is imported here.
"""
