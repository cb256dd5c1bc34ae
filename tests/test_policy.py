"""Policy: generation, re-scoring, the shared-prompt fast paths and checkpoints agree.

A tiny-s model (~140k parameters, char tokenizer) built on the spot; prompts of different
lengths so that left padding is always in play. Each check runs with the shared prompt prefill
on and off, and the two must agree to float noise.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollshare.policies.base import Policy
from rollshare.policies.tiny import char_tokenizer, tiny_model

# lengths 1..8: the one-token prompt has nothing but padding in the shared prefill
PROMPTS = ["12+7=", "5+3=", "100-37=", "9*8=", "2+2+2+2=", "7"]
G = 4


def make_policy(seed: int = 0) -> Policy:
    tok = char_tokenizer()
    return Policy(tiny_model("tiny-s", len(tok), tok, seed), tok, "t")


@pytest.fixture(scope="module")
def policy() -> Policy:
    torch.set_num_threads(1)
    return make_policy()


@pytest.fixture
def prefills(monkeypatch):
    """Counts prompt-cache prefills, to check which path a call took."""
    calls = []
    original = Policy._prompt_cache

    def counting(self, ids, mask):
        calls.append(ids.shape)
        return original(self, ids, mask)

    monkeypatch.setattr(Policy, "_prompt_cache", counting)
    return calls


def flat(groups):
    return [s for group in groups for s in group]


def padded(rows, width):
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefill", "plain"])
def test_generated_logprobs_match_rescoring(policy, share, prefills):
    torch.manual_seed(1)
    samples = flat(policy.generate(PROMPTS, G, max_new_tokens=6, temperature=0.9, share_prompt_prefill=share))
    # one prefill row per prompt, all but the last column of the padded prompts
    assert prefills == ([(len(PROMPTS), max(map(len, PROMPTS)) - 1)] if share else [])
    assert len(samples) == len(PROMPTS) * G
    assert all(s.completion_ids for s in samples)
    assert all(s.text == policy.decode(s.completion_ids) for s in samples)
    logp, mask = policy.token_logprobs([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                                       temperature=0.9)
    behaviour = padded([s.logprobs for s in samples], logp.shape[1])
    assert torch.equal(mask, padded([[1.0] * len(s.completion_ids) for s in samples], logp.shape[1]))
    assert (logp - behaviour).abs().max().item() < 1e-5


def test_shared_prefill_samples_the_same_completions(policy):
    runs = []
    for share in (True, False):
        torch.manual_seed(2)
        runs.append(flat(policy.generate(PROMPTS, G, max_new_tokens=6, share_prompt_prefill=share)))
    shared, plain = runs
    assert [s.completion_ids for s in shared] == [s.completion_ids for s in plain]
    for a, b in zip(shared, plain):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefill", "plain"])
def test_greedy_output_does_not_depend_on_padding(policy, share):
    batch = policy.generate(PROMPTS, 2, max_new_tokens=8, greedy=True, share_prompt_prefill=share)
    for prompt, group in zip(PROMPTS, batch):
        alone = policy.generate([prompt], 2, max_new_tokens=8, greedy=True, share_prompt_prefill=share)[0]
        assert [s.completion_ids for s in group] == [s.completion_ids for s in alone]
        assert group[0].completion_ids == group[1].completion_ids  # greedy: the G copies agree


def test_generate_falls_back_to_plain_path_for_beam_search_and_single_samples(policy, prefills):
    # beams turn one row into several, so the prompt cache cannot be prepared outside generate
    out = policy.generate(PROMPTS[:2], 2, max_new_tokens=4, greedy=True, generate_kwargs={"num_beams": 2})
    assert [len(group) for group in out] == [2, 2]
    assert [len(group) for group in policy.generate(PROMPTS[:2], 1, max_new_tokens=4)] == [1, 1]
    assert prefills == []


def grpo_like_rows(policy: Policy):
    """Groups of G completions sharing a prompt, in batch order, prompts of mixed lengths."""
    torch.manual_seed(3)
    samples = flat(policy.generate(PROMPTS, G, max_new_tokens=6))
    return [s.prompt_ids for s in samples], [s.completion_ids for s in samples]


def test_shared_prompt_rescoring_matches_plain_logprobs_and_gradients(prefills):
    policy = make_policy(seed=5)
    prompt_ids, completion_ids = grpo_like_rows(policy)
    prefills.clear()
    results = []
    for share in (True, False):
        policy.model.zero_grad(set_to_none=True)
        logp, mask = policy.token_logprobs(prompt_ids, completion_ids, temperature=0.8, grad=True,
                                           share_prompt_prefill=share)
        # weight tokens unevenly so every position's gradient counts
        weights = torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)
        (-(logp * weights).sum() / mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), mask, grads))
    assert len(prefills) == 1 and prefills[0][0] == len(PROMPTS)  # only the shared run, once per prompt
    (lp_s, m_s, g_s), (lp_p, m_p, g_p) = results
    assert torch.equal(m_s, m_p)
    assert (lp_s - lp_p).abs().max().item() < 1e-6
    assert g_s.keys() == g_p.keys() and g_s
    for name in g_s:
        assert (g_s[name] - g_p[name]).abs().max().item() < 1e-5, name


def test_shared_prompt_rescoring_handles_unordered_and_unique_prompts(policy):
    prompt_ids, completion_ids = grpo_like_rows(policy)
    order = torch.randperm(len(prompt_ids), generator=torch.Generator().manual_seed(0)).tolist()
    prompt_ids = [prompt_ids[i] for i in order] + [policy.encode(["77+1="])[0]]
    completion_ids = [completion_ids[i] for i in order] + [policy.encode(["78"])[0] + [policy.eos_id]]
    shared, _ = policy.token_logprobs(prompt_ids, completion_ids, share_prompt_prefill=True)
    plain, _ = policy.token_logprobs(prompt_ids, completion_ids, share_prompt_prefill=False)
    assert (shared - plain).abs().max().item() < 1e-6


def test_saved_policy_opens_with_plain_transformers(policy, tmp_path):
    policy.save(tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    ids = torch.tensor([tok("12+7=", add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [policy.encode(["12+7="])[0]]
    policy.model.eval()
    with torch.no_grad():
        expected = policy.model(input_ids=ids).logits
        # config.json does not record the attention kernel: a plain load picks the default
        # (sdpa), equal up to float noise; with the policy's kernel the logits are identical
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", local_files_only=True, dtype=torch.float32)
        assert (plain.eval()(input_ids=ids).logits - expected).abs().max().item() < 1e-5
        same = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", local_files_only=True, dtype=torch.float32,
                                                    attn_implementation=policy.model.config._attn_implementation)
        assert torch.equal(same.eval()(input_ids=ids).logits, expected)


def test_score_texts_matches_token_logprobs_of_the_same_ids(policy):
    prompts, completions = ["12+7=", "5+3=", "5+3="], ["19", "8", "9"]
    scored = policy.score_texts(prompts, completions, temperature=0.7)
    p_ids = policy.encode(prompts)
    c_ids = [ids + [policy.eos_id] for ids in policy.encode(completions)]
    logp, mask = policy.token_logprobs(p_ids, c_ids, temperature=0.7, share_prompt_prefill=False)
    assert [len(s) for s in scored] == [len(c) for c in c_ids]
    for row, lp, c in zip(scored, logp, c_ids):
        assert max(abs(a - b) for a, b in zip(row, lp[: len(c)].tolist())) < 1e-6


def test_optimizer_step_changes_the_weights(policy):
    p = make_policy(seed=7)
    before = [t.detach().clone() for t in p.model.parameters()]
    prompt_ids, completion_ids = grpo_like_rows(p)
    logp, mask = p.token_logprobs(prompt_ids, completion_ids, grad=True)
    norm = p.optimizer_step(-(logp.sum() / mask.sum()))
    assert norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, p.model.parameters()))
