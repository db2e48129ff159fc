"""Fed-BioMed's TanaT tutorial, end to end with fedpod (the same as `fedpod demo --journeys`).

    python examples/journeys/run.py [--out journeys-tutorial] [--patients 3000] [--model journey_gru|journey_mlp]
                                    [--target "gender = 'F'"]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpod.cli.demo_journeys import run_journeys_demo

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, default=Path("journeys-tutorial"))
parser.add_argument("--patients", type=int, default=3000)
parser.add_argument("--model", default="journey_gru", choices=["journey_gru", "journey_mlp"])
parser.add_argument("--target", default="diabetes_next_year",
                    help="a static column or expression; the tutorial's own is: gender = 'F'")
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()
run_journeys_demo(args.out, patients=args.patients, model=args.model, target=args.target, seed=args.seed)
