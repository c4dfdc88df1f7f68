"""``python -m cryosxt_sim``: the simulator's command line (see ``cryosxt_sim.simulate.main``)."""

from __future__ import annotations


def main() -> None:
    import fire

    from cryosxt_sim.simulate import main as simulate

    fire.Fire(simulate, name="cryosxt_sim")


if __name__ == "__main__":
    main()
