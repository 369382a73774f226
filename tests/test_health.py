"""Each health alarm fires once, at the right iteration, on a stream built to trigger it; a clean run fires none."""

import pytest

from rlhflab.evaluation.health import HealthMonitor, check_health


def clean_rows(n: int = 12) -> list[dict]:
    """A healthy run: score rising, small positive KL, ratios near 1, stable EOS, critic learning, diversity kept."""
    return [
        {
            "iteration": i,
            "objective/scores": 0.1 + 0.05 * i,
            "objective/kl": 0.02 * i,
            "objective/kl_k1": 0.02 * i,
            "policy/ratio_mean": 1.0 + 0.01 * (-1) ** i,
            "policy/ratio_max": 1.5,
            "rollout/eos_rate": 0.9,
            "value/explained_variance": -0.5 if i <= 5 else 0.4,  # negative only during the warm-up
            "diversity/distinct_2": 0.8 - 0.01 * i,
            **({"eval/unrelated/behavior_rate": 0.1, "eval/trained/behavior_rate": 0.1 * i} if i % 4 == 0 else {}),
        }
        for i in range(1, n + 1)
    ]


def with_changes(changes: dict[int, dict]) -> list[dict]:
    """The clean run with some rows' metrics overwritten: {iteration: {key: value}}."""
    rows = clean_rows()
    for row in rows:
        row.update(changes.get(row["iteration"], {}))
    return rows


def fired(rows: list[dict]) -> list[tuple[str, int]]:
    return [(note.code, note.iteration) for note in check_health(rows)]


def test_clean_stream_fires_nothing():
    assert check_health(clean_rows()) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # k1 mean clearly negative at iteration 4 (and again later: still one note)
        ({4: {"objective/kl_k1": -0.8}, 9: {"objective/kl_k1": -0.9}}, ("negative_kl", 4)),
        # objective/kl < 0 at 6, 7, 8: the third in a row fires; a single dip at 3 does not
        ({3: {"objective/kl": -0.01}, **{i: {"objective/kl": -0.01} for i in (6, 7, 8)}}, ("negative_kl", 8)),
        ({7: {"policy/ratio_max": 250.0}}, ("ratio_blowup", 7)),
        ({5: {"policy/ratio_mean": 1.35}}, ("ratio_blowup", 5)),
        # 0.9 -> 0.5 is not below 0.5; 0.4 is below both half the first value (0.45) and 0.5; third in a row: 10
        ({6: {"rollout/eos_rate": 0.5}, **{i: {"rollout/eos_rate": 0.4} for i in range(8, 13)}}, ("eos_collapse", 10)),
        # negative from 6 on: the fifth negative iteration after the warm-up is 10
        ({i: {"value/explained_variance": -0.2} for i in range(6, 13)}, ("value_ev_negative", 10)),
        # 0.79 at iteration 1; <= 0.553 is a 30% fall
        ({i: {"diversity/distinct_2": 0.5} for i in range(9, 13)}, ("diversity_collapse", 9)),
        # score rose > 0.2 from 0.15 by iteration 5; unrelated group's rate jumps at the eval of iteration 8
        ({8: {"eval/unrelated/behavior_rate": 0.4}}, ("edit_leaking", 8)),
    ],
)
def test_alarm_fires_once_at_the_right_iteration(changes, expected):
    assert fired(with_changes(changes)) == [expected]


@pytest.mark.parametrize(
    "rates",
    [{1: 0.12, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0},  # answers mostly truncated from the start: nothing to lose
     {5: 0.2, 6: 0.2, 7: 0.9, 9: 0.1}],  # dips shorter than three iterations: sampling noise
    ids=["rarely-stopped-at-start", "short-dips"],
)
def test_eos_collapse_ignores_noise_and_runs_that_never_stopped(rates):
    assert fired(with_changes({i: {"rollout/eos_rate": r} for i, r in rates.items()})) == []


def test_edit_leaking_ignores_groups_that_should_move():
    assert fired(with_changes({8: {"eval/related/behavior_rate": 0.9}})) == []


def test_edit_leaking_watches_capability_groups():
    key = "eval/capability_math/behavior_rate"
    assert fired(with_changes({4: {key: 0.5}, 12: {key: 0.0}})) == [("edit_leaking", 12)]


def test_monitor_returns_each_note_once_with_cause_and_fix():
    monitor = HealthMonitor()
    rows = with_changes({3: {"policy/ratio_max": 500.0}, 4: {"policy/ratio_max": 600.0}})
    notes_per_row = [monitor.update(row) for row in rows]
    assert [len(notes) for notes in notes_per_row] == [0, 0, 1] + [0] * 9
    note = notes_per_row[2][0]
    assert "policy/ratio_max" in note.message and "500" in note.message and "iteration 3" in note.message
    assert "\n" not in note.message and note.cause and note.fix


def test_missing_keys_and_nan_are_ignored():
    rows = [{"iteration": 1}, {"iteration": 2, "objective/kl": float("nan"), "rollout/eos_rate": None}]
    assert check_health(rows) == []


def test_monitor_state_survives_a_json_round_trip_mid_run():
    """Split at iteration 6 and restored from JSON: a streak across the split (EOS falls at 5, 6, 7), a baseline
    from before it (distinct-2 from iteration 1) and an alarm that already fired (ratio at 3, again at 8) behave
    as in an unbroken run."""
    import json

    rows = with_changes({3: {"policy/ratio_max": 500.0}, 8: {"policy/ratio_max": 500.0},
                         **{i: {"rollout/eos_rate": 0.1} for i in (5, 6, 7)}, 10: {"diversity/distinct_2": 0.5}})
    unbroken = check_health(rows)
    assert [(n.code, n.iteration) for n in unbroken] == [("ratio_blowup", 3), ("eos_collapse", 7),
                                                         ("diversity_collapse", 10)]
    before = HealthMonitor()
    notes = [note for row in rows[:6] for note in before.update(row)]
    after = HealthMonitor()
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))
    notes += [note for row in rows[6:] for note in after.update(row)]
    assert notes == unbroken
