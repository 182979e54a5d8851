"""`python -m benchmarks`: see benchmarks/run.py and benchmarks/README.md.
`python -m benchmarks --integrations ...`: the trainer integrations (benchmarks/integrations.py).
`python -m benchmarks --scale ...`: issue 13's scale simulation (benchmarks/scale.py)."""

import sys

if "--integrations" in sys.argv[1:]:
    from benchmarks import integrations_dist
    from benchmarks.integrations import main as integrations_main

    integrations_dist.register()  # olmo-core and torchtitan: 2 gloo ranks each
    sys.exit(integrations_main([a for a in sys.argv[1:] if a != "--integrations"]))

if "--scale" in sys.argv[1:]:
    from benchmarks.scale import main as scale_main

    sys.exit(scale_main([a for a in sys.argv[1:] if a != "--scale"]))

from benchmarks.run import main

sys.exit(main())
