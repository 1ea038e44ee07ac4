"""The lowest layer: what every stage uses and no stage owns.

    cluster    connecting to Ray (address precedence, token auth, Ray Client)
    plan       the resource plan, checked before anything launches
    storage    every file raylab writes, local or s3:// alike
    runs       the run-directory and $RAYLAB_HOME layout; typed stage outputs
    secrets    ${env:NAME} references
    detectors  PII and secret detectors (the data stage redacts, config validation checks)
    jobs       a config as a Ray job (`raylab submit`)
    doctor     what `raylab doctor` prints

core imports no stage and no config module at run time (it takes a config object and reads
the fields it needs); import-linter holds this in CI (.importlinter).
"""
