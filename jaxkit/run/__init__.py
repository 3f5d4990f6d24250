"""The application layer: turns a config into a run and drives it.

    build     config -> mesh, model, optimizer, train state, data (and the
              config checks that need the other packages)
    trainer   the training loop
    load      a run's checkpoint restored onto a mesh (eval, export, quantize);
              a model from a run, exported or quantised parameters on one device
    evaluate  mean eval metrics of a model or a run
    export    a run's parameters alone, for inference
    quantize  post-training quantisation of a run (`jaxkit quantize`)
    generate  text from a run, its exported or its quantised parameters
              (`jaxkit generate`, load_generator for notebooks)
    decode_speed  generation speed of a config at several batch sizes, with
              bf16 or quantised weights, against the weight-bandwidth roofline
    bench     training-loop throughput on 1, 2, ... devices
    sweep     `jaxkit sweep` and `jaxkit report` (jaxkit.sweep's runs and report)
    cli       the `jaxkit` command

Library packages (config, layers, models, quant, sharding, train,
checkpoint, data, sweep) never import this package. Nothing is imported here, so
`import jaxkit.run.cli` starts no jax.
"""
