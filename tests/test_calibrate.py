import itertools

import numpy as np

from delta_jax.calibrate import best_selection_layers, schedule_coverage


def test_dynamic_programme_finds_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.uniform(0.2, 1.0, (9, 9))
        for count in (1, 2, 3):
            got = best_selection_layers(m, full=2, count=count)
            assert got[0] == 2 and len(got) == count
            best = max(schedule_coverage(m, 2, (2,) + rest)
                       for rest in itertools.combinations(range(3, 9), count - 1))
            assert np.isclose(schedule_coverage(m, 2, got), best)


def test_coverage_drop_gets_a_selection_layer():
    m = np.full((8, 8), 0.95)
    m[:5, 5:] = 0.2   # layers from 5 on attend elsewhere than layers before them
    assert best_selection_layers(m, full=1, count=2) == (1, 5)
