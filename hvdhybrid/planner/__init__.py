"""The planner: choose the layout from measured costs (``hvdtrain plan --auto``).

    space     every choice of tensor, stages, stages per rank, schedule, microbatches, --zero,
              --recompute that fits a world (pure)
    probe     each stage's forward and backward time, what it sends, its tensor collectives:
              measured in one process
    links     point-to-point latency and bandwidth between two ranks, measured with mpirun
    predict   a choice's step time: the schedule simulator over those costs, the average across
              bundles, the optimizer (pure)
    search    every choice weighed: memory (training.memory_plan) and time, ranked
    render    what plan --auto prints
    auto      choose_layout: --layout auto in a run (hvdtrain plan --auto: cli/plan_auto)
"""
