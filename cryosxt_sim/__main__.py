"""``python -m cryosxt_sim``: the simulator's command line (see ``cryosxt_sim.simulate.main``)."""

from __future__ import annotations


def main() -> None:
    from cryosxt_sim.bundle_io import bundle_module
    from cryosxt_sim.simulate import main as simulate

    # The bundle's command-line edge: flags checked before any work, errors as one ERROR: line.
    bundle_module("cli").run_main(simulate, name="cryosxt_sim")


if __name__ == "__main__":
    main()
