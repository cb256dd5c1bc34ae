"""Generation methods, their measurements and the selector that picks one per task.

    methods   named ways to generate (setup + generate, feasibility, lossless or not)
    features  what describes a task: workload, model, hardware (+ a seconds-long fingerprint)
    history   the append-only record of measurements (JSONL, versioned schema)
    selector  the learner (throughput from features) and the online layer (Thompson sampling)

Nothing here knows about the round loop, rewards or the network: the node asks a `Selector`
for a method name, runs it through `methods.run_method`, and reports the measurement back.
"""
