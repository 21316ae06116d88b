"""Entry point for `ray job submit`: the same CLI, run as the job's driver.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_pipeline.py run configs/cluster/gpt-124m.yaml --workdir s3://bucket/runs/exp1

Inside a job, RAY_ADDRESS points at the cluster, so the pipeline connects to
it instead of starting a local one.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
