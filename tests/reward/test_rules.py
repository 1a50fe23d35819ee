"""Reward building blocks without a server: scorer specs, every built-in rule, running
normalisation, the checks on what a scorer returns, and user-function arguments."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument
from services.reward.items import Item
from services.reward.mix import ScorerFailed, check_scores
from services.reward.normalize import RunningNorm
from services.reward.rules import build_rule, final_number
from services.reward.spec import parse_spec, parse_specs, split_query
from services.reward.user_fn import call_arguments, load_function


def rule(arg: str):
    fn, _ = build_rule(arg)
    return lambda completion, reference="": fn(Item(completion, prompt="p", reference=reference))


# ---- specs -------------------------------------------------------------------------------------


def test_spec_weight_kind_and_name():
    s = parse_spec("0.5*rm:/models/rm")
    assert (s.kind, s.arg, s.weight, s.name) == ("rm", "/models/rm", 0.5, "rm:/models/rm")
    assert parse_spec("rule:length?target=3").weight == 1.0
    assert parse_spec("-2e-1 * python:mod:fn").weight == -0.2
    # A '*' inside the argument is not a weight.
    s = parse_spec("rule:regex?pattern=a*b")
    assert (s.weight, s.arg) == (1.0, "regex?pattern=a*b")
    s = parse_spec("3*rule:regex?pattern=x*")
    assert (s.weight, s.arg) == (3.0, "regex?pattern=x*")


@pytest.mark.parametrize("bad", ["", "rm", "nope:thing", "x*rule:length", "2*:arg"])
def test_bad_specs_fail_with_the_spec_in_the_message(bad):
    with pytest.raises(FailedPrecondition, match="scorer spec"):
        parse_spec(bad)


def test_duplicate_scorer_is_refused():
    with pytest.raises(FailedPrecondition, match="twice"):
        parse_specs(["rule:length?target=3", "2*rule:length?target=3"])


def test_query_keeps_plus_and_decodes_percent():
    assert split_query("regex?pattern=a%2Bb+c&flags=i") == (
        "regex", {"pattern": "a+b+c", "flags": "i"})
    with pytest.raises(FailedPrecondition, match="twice"):
        split_query("length?target=1&target=2")
    with pytest.raises(FailedPrecondition, match="key=value"):
        split_query("length?target")


# ---- rules -------------------------------------------------------------------------------------


def test_length_rule():
    r = rule("length?target=4")
    assert r("one two three four") == 1.0
    assert r("one two") == 0.5
    assert r("a b c d e f") == 0.5
    assert r(" ".join(["w"] * 9)) == 0.0
    assert rule("length?target=10&unit=chars")("abcde") == 0.5
    assert rule("length?target=2&unit=lines")("a\nb") == 1.0


def test_keywords_rule_present_all_absent_whole_words_and_case():
    assert rule("keywords?words=cat|dog")("I like my Dog.") == 1.0
    assert rule("keywords?words=cat|dog")("I like my hotdog.") == 0.0  # whole words only
    assert rule("keywords?words=cat|dog&mode=all")("cat and dog") == 1.0
    assert rule("keywords?words=cat|dog&mode=all")("cat only") == 0.0
    assert rule("keywords?words=sorry|apologize&mode=none")("Here you go.") == 1.0
    assert rule("keywords?words=sorry&mode=none")("Sorry, no.") == 0.0
    assert rule("keywords?words=Paris&case=sensitive")("paris") == 0.0
    assert rule("keywords?words=new york")("I love New York!") == 1.0


def test_regex_rule():
    assert rule("regex?pattern=^Answer: \\d%2B$&flags=m")("Think.\nAnswer: 42") == 1.0
    assert rule("regex?pattern=^Answer: \\d%2B$")("Think.\nAnswer: 42") == 0.0
    assert rule("regex?pattern=\\d%2B&match=full")("123") == 1.0
    assert rule("regex?pattern=\\d%2B&match=full")("123 apples") == 0.0
    assert rule("regex?pattern=hello&flags=i")("HeLLo there") == 1.0
    with pytest.raises(FailedPrecondition, match="not a valid regex"):
        build_rule("regex?pattern=(unclosed")
    with pytest.raises(FailedPrecondition, match="flags"):
        build_rule("regex?pattern=a&flags=x")


def test_format_rule():
    assert rule("format?kind=json")(' {"a": [1, 2]} ') == 1.0
    assert rule("format?kind=json")("{'a': 1}") == 0.0
    assert rule("format?kind=boxed")("so \\boxed{42}.") == 1.0
    assert rule("format?kind=boxed")("so \\boxed{ }.") == 0.0
    think = rule("format?kind=think")
    assert think("<think>hmm</think>\n<answer>4</answer>") == 1.0
    assert think("<answer>4</answer>") == 0.0
    assert think("<think>a</think><answer>4</answer> trailing text") == 0.0


def test_final_number_extraction():
    assert final_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == 72.0
    assert final_number("The total is $1,234.50 in all.") == 1234.5
    assert final_number("first 3 then \\boxed{-7} then 9") == -7.0
    assert final_number("numbers 5,6") == 6.0  # a comma between digits is not a separator here
    assert final_number("no digits") is None


def test_final_number_rule_against_reference():
    r = rule("final_number")
    gsm8k_ref = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    assert r("So the answer is 7.", gsm8k_ref) == 1.0
    assert r("I think 8.", gsm8k_ref) == 0.0
    assert r("I cannot tell.", gsm8k_ref) == 0.0
    assert r("That makes 1,000.", "#### 1000") == 1.0
    assert r("\\boxed{0.5}", "1/2 = 0.5") == 1.0
    with pytest.raises(InvalidArgument, match="no number"):
        r("7", "seven")
    assert build_rule("final_number")[1] is True  # the service checks items carry a reference


def test_repetition_rule():
    r = rule("repetition?n=2")
    assert r("a b c d e") == 0.0
    assert r("a b a b a b a b") == pytest.approx(-(1 - 2 / 7))
    assert r("a") == 0.0
    assert rule("repetition")("la la la la la la la la la la") < -0.8


@pytest.mark.parametrize("arg,message", [
    ("nope", "unknown rule"),
    ("length", "'target' is required"),
    ("length?target=0", "must be a finite number >= 1"),
    ("length?target=abc", "not an integer"),
    ("length?target=3&unit=pages", "not one of"),
    ("length?target=3&colour=red", "unknown parameter"),
    ("keywords?words=", "lists no words"),
])
def test_bad_rule_parameters_fail_at_start_up(arg, message):
    with pytest.raises(FailedPrecondition, match=message) as err:
        build_rule(arg)
    assert f"rule:{arg}" in err.value.message or "unknown rule" in message


# ---- normalisation and output checks -----------------------------------------------------------


def test_running_norm_matches_batch_statistics():
    rng = random.Random(0)
    values = [rng.gauss(3.0, 2.0) for _ in range(500)]
    norm = RunningNorm()
    norm.update(values[:200])
    norm.update(values[200:])
    assert norm.mean == pytest.approx(statistics.fmean(values), rel=1e-9)
    assert norm.std == pytest.approx(statistics.pstdev(values), rel=1e-9)
    out = norm.apply(values)
    assert statistics.fmean(out) == pytest.approx(0.0, abs=1e-9)
    assert statistics.pstdev(out) == pytest.approx(1.0, rel=1e-9)


def test_running_norm_centres_constant_streams_and_freezes():
    assert RunningNorm()([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    norm = RunningNorm(freeze_after=4)
    norm([1.0, 2.0, 3.0, 4.0])
    mean, std = norm.mean, norm.std
    first = norm([10.0])
    assert norm([10.0]) == first  # frozen: the same input, the same score
    assert (norm.mean, norm.std, norm.count) == (mean, std, 4)


def test_check_scores_names_the_scorer():
    assert check_scores("s", (1, 2.5, True), 3) == [1.0, 2.5, 1.0]
    for raw, message in [([1.0], "1 scores for 2 items"), ([1.0, math.nan], "nan for item 1"),
                         ([1.0, math.inf], "inf for item 1"), (None, "NoneType"),
                         ("ab", "str"), ([1.0, "x"], "other than numbers")]:
        with pytest.raises(ScorerFailed, match=message) as err:
            check_scores("python:m:f", raw, 2)
        assert "python:m:f" in err.value.message


# ---- user functions ----------------------------------------------------------------------------


def test_user_function_arguments_follow_trl():
    items = [
        Item("text answer", prompt="hi", reference="42", metadata={"lang": "en"}),
        Item("chat answer", messages=(("system", "be brief"), ("user", "hello"))),
    ]
    prompts, completions, kwargs = call_arguments(items)
    assert prompts == ["hi", [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hello"}]]
    assert completions == ["text answer", [{"role": "assistant", "content": "chat answer"}]]
    assert kwargs == {"reference": ["42", ""], "lang": ["en", None]}
    with pytest.raises(InvalidArgument, match="reserved"):
        call_arguments([Item("x", prompt="p", metadata={"prompts": "1"})])


def test_load_function_by_module_or_file(tmp_path):
    assert load_function("tests.fixtures.reward_helpers:word_count")([""], ["a b"]) == [2]
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(prompts, completions, **kw):\n"
                    "    return [float(c.isupper()) for c in completions]\n")
    assert load_function(f"{path}:shout")(["p"], ["HEY"]) == [1.0]
    for arg, message in [("no_such_module_xyz:f", "cannot import"),
                         ("tests.fixtures.reward_helpers:missing", "no attribute"),
                         ("tests.fixtures.reward_helpers:QUESTIONS", "not callable"),
                         ("justamodule", "MODULE:FUNCTION"),
                         (f"{tmp_path}/absent.py:f", "does not exist")]:
        with pytest.raises(FailedPrecondition, match=message):
            load_function(arg)


def test_scorers_from_env_yaml_and_flags(tmp_path, monkeypatch):
    from rlhf.plumbing.config import ConfigError
    from services.reward.config import RewardConfig

    monkeypatch.setenv("RLHF_REWARD_SCORER", "rule:length?target=3, 0.5*rule:repetition")
    assert RewardConfig.load().scorer == ["rule:length?target=3", "0.5*rule:repetition"]
    monkeypatch.delenv("RLHF_REWARD_SCORER")
    yaml_file = tmp_path / "reward.yaml"
    yaml_file.write_text("scorer:\n  - rule:keywords?words=a,b|c\n  - 2*rule:format\n"
                         "max_batch_size: 8\nnormalize: rm\n")
    cfg = RewardConfig.load(yaml_file)
    assert cfg.scorer == ["rule:keywords?words=a,b|c", "2*rule:format"]  # commas kept in YAML
    assert (cfg.max_batch_size, cfg.normalize) == (8, "rm")
    assert RewardConfig.load(yaml_file, scorer=["rule:format"]).scorer == ["rule:format"]
    with pytest.raises(ConfigError, match="normalize"):
        RewardConfig.load(normalize="sometimes")
    with pytest.raises(ConfigError, match="device"):
        RewardConfig.load(device="tpu")
