import pytest

from rollshare.tasks import (FAMILIES, TaskDrawer, TaskError, TaskSpec, extract_answer, heldout_tasks, is_heldout,
                             load_reward_fn, parse_mix, regenerate, score_group, verify)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spec_regenerates_the_same_question_and_gold_scores_one(family):
    spec = TaskSpec.make(family, {}, seed=7, index=123456)
    a, b = regenerate(spec), regenerate(TaskSpec.from_json(family, spec.params_json, 7, 123456, "compact"))
    assert a.prompt == b.prompt and a.answer == b.answer
    assert verify(a, a.answer) == 1.0
    assert verify(a, a.answer + "</s>junk\nmore") == 1.0 or verify(a, a.answer + "\nmore") == 1.0
    assert verify(a, "not the answer") == 0.0


def test_compact_and_full_styles_share_ground_truth():
    c = regenerate(TaskSpec.make("chain_sum", {}, 1, 5, "compact"))
    f = regenerate(TaskSpec.make("chain_sum", {}, 1, 5, "full"))
    assert c.answer == f.answer
    assert c.prompt.endswith("=") and " " not in c.prompt
    assert f.prompt.startswith("State the final answer")


def test_reward_is_strict_zero_or_one():
    t = regenerate(TaskSpec.make("spell_backward", {}, 3, 3))
    # a near miss gets partial credit from reasoning-gym but 0 from us
    near = t.answer[:-1] + ("q" if t.answer[-1] != "q" else "z")
    fam_ds = __import__("rollshare.tasks", fromlist=["_dataset"])
    assert 0 < fam_ds._dataset("spell_backward", '{"max_word_len":4,"min_word_len":3}', 3).score_answer(near, t.entry) < 1
    assert verify(t, near) == 0.0
    assert verify(t, t.answer) == 1.0


@pytest.mark.parametrize("bad", [
    TaskSpec.make("no_such_family", {}, 1, 1),
    TaskSpec.make("chain_sum", {"evil": 1}, 1, 1),
    TaskSpec.make("chain_sum", {}, -1, 1),
    TaskSpec.make("chain_sum", {}, 1, 1, style="weird"),
    TaskSpec.make("chain_sum", {"min_terms": 5, "max_terms": 2}, 1, 1),
])
def test_bad_specs_raise_task_error(bad):
    with pytest.raises(TaskError):
        regenerate(bad)


def test_from_json_rejects_non_objects():
    with pytest.raises(TaskError):
        TaskSpec.from_json("chain_sum", "[1,2]", 1, 1, "compact")
    with pytest.raises(TaskError):
        TaskSpec.from_json("chain_sum", "{nope", 1, 1, "compact")


def test_training_draws_never_hit_heldout_items():
    drawn = TaskDrawer({"chain_sum": 1.0}, seed=3).draw(300)
    assert not any(is_heldout(t) for t in drawn)
    held = heldout_tasks("chain_sum", 50)
    assert len(held) == 50 and all(is_heldout(t) for t in held)
    assert not {t.prompt for t in held} & {t.prompt for t in drawn}


def test_drawer_is_deterministic_and_resumable():
    a, b = TaskDrawer({"chain_sum": 1, "spell_backward": 1}, seed=5), TaskDrawer({"chain_sum": 1, "spell_backward": 1}, seed=5)
    a.draw(10)
    state = a.getstate()
    b.setstate(state)
    assert [t.prompt for t in a.draw(5)] == [t.prompt for t in b.draw(5)]


def test_parse_mix_normalises_and_explains_errors():
    assert parse_mix("chain_sum:3,spell_backward") == {"chain_sum": 0.75, "spell_backward": 0.25}
    with pytest.raises(TaskError, match="unknown task family 'bogus'"):
        parse_mix("bogus")
    with pytest.raises(TaskError, match="must be > 0"):
        parse_mix("chain_sum:0")


def test_extract_answer():
    assert extract_answer(" 42 \nblah") == "42"
    assert extract_answer("think <answer> 7 </answer>") == "7"
    assert extract_answer("") == ""


def reward_len_is_2(completions, **kwargs):
    assert "answer" in kwargs and "prompts" in kwargs
    return [1.0 if len(c) == 2 else 0.0 for c in completions]


def test_custom_trl_style_reward_function_replaces_the_verifier():
    fn = load_reward_fn("test_tasks:reward_len_is_2")
    t = regenerate(TaskSpec.make("chain_sum", {}, 1, 1))
    assert score_group(t, ["ab", "abc", "xy"], fn) == [1.0, 0.0, 1.0]
    with pytest.raises(TaskError):
        load_reward_fn("no_colon")
    with pytest.raises(TaskError):
        load_reward_fn("test_tasks:missing")
