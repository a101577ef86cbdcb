"""Graded exercises (dpo_lab.grading) and the student copies made from them (scripts/student_copies.py).

The solutions in the notebooks pass their graders; every stub and each deliberately wrong solution below
fails its grader with a message that says what is wrong, and the library's version then takes its place, so
that the notebook goes on; notebooks/student/ is what ``make student`` writes.
Only the notebooks' import statements, exercise cells and grader cells are run here (the project's own
committed source), never the rest of a notebook.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
import torch

from dpo_lab import bandit as bd
from dpo_lab.grading import bandit_cases, grade

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("student_copies", ROOT / "scripts" / "student_copies.py")
student = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up
spec.loader.exec_module(student)
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = {path.name: jupytext.read(path) for path in sorted(NOTEBOOKS.glob("*.py"))}
EXERCISES = [ex for name, nb in SOLUTIONS.items() for ex in student.exercises(nb, name)]
FUNCTIONS = [(ex, fn) for ex in EXERCISES for fn in ex.functions]


def _parsed(source: str) -> list[ast.stmt]:
    try:
        return ast.parse(source).body
    except SyntaxError:  # a cell with IPython magics holds no import statement this test needs
        return []


def _imports(nb) -> dict:
    """A namespace holding only what the notebook imports: graders may use nothing else."""
    nodes = [node for cell in nb.cells if cell.cell_type == "code" for node in _parsed(cell.source)
             if isinstance(node, (ast.Import, ast.ImportFrom))]
    namespace: dict = {}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "<imports>", "exec"), namespace)
    return namespace


def _solved(notebook: str) -> dict:
    """The imports plus every exercise cell of the solution notebook, in order."""
    namespace = _imports(SOLUTIONS[notebook])
    for ex in EXERCISES:
        if ex.notebook == notebook:
            exec(ex.source, namespace)
    return namespace


def _run_grader(ex: student.Exercise, namespace: dict) -> str:
    out = io.StringIO()
    # errstate: a mutant that makes nan or inf is reported by the grader; numpy need not warn about it too
    with contextlib.redirect_stdout(out), np.errstate(all="ignore"):
        exec(ex.grader, namespace)
    return out.getvalue()


def _failure(printed: str, fn: str) -> str:
    """The grader's report on ``fn``: the ✗ line and the lines under it, with the "going on" line."""
    going_on = "\n  → using the library's version so the notebook can go on$"
    found = re.search(rf"^✗ (.*?){going_on}", printed, re.M | re.S)
    assert found, f"no failure with a fallback reported for {fn}:\n{printed}"
    return found.group(1)


def _id(item) -> str:
    ex, fn = item if isinstance(item, tuple) else (item, None)
    return f"{ex.notebook[:2]}-{fn or '+'.join(ex.functions)}"


# ----------------------------------------------------------------------------------------------------------
# the exercises of notebooks 01-02


def test_the_bandit_notebooks_have_exercises_of_every_tier():
    bandit = [ex for ex in EXERCISES if ex.notebook[:2] in ("01", "02")]
    assert {ex.notebook for ex in bandit} == {"01_rlhf_to_dpo.py", "02_dpo_vs_rlhf_bandit.py"}
    assert {ex.tier for ex in bandit} == set(student.TIERS)


@pytest.mark.parametrize("ex", EXERCISES, ids=_id)
def test_every_solution_passes_its_grader(ex):
    printed = _run_grader(ex, _solved(ex.notebook))
    for fn in ex.functions:  # every function of the cell is graded, not just the first
        assert re.search(rf"^✓ {fn}: \d+ cases match$", printed, re.M), f"{fn} is not graded:\n{printed}"


@pytest.mark.parametrize("item", FUNCTIONS, ids=_id)
def test_each_stub_fails_its_grader_as_not_implemented(item):
    ex, fn = item
    stubs = _imports(SOLUTIONS[ex.notebook])
    exec(student.stub(ex.source, ex.tier), stubs)
    namespace = _solved(ex.notebook)
    namespace[fn] = stubs[fn]  # only this function is missing; the others in its cell are solved
    assert _failure(_run_grader(ex, namespace), fn) == f"not implemented yet: fill in {fn}"


@pytest.mark.parametrize("item", FUNCTIONS, ids=_id)
def test_after_a_failure_the_library_stands_in_and_passes_the_same_check(item):
    """The stand-in takes and gives what the exercise does: run again, the check cell passes on it."""
    ex, fn = item
    stubs = _imports(SOLUTIONS[ex.notebook])
    exec(student.stub(ex.source, ex.tier), stubs)
    namespace = _solved(ex.notebook)
    namespace[fn] = stubs[fn]
    _failure(_run_grader(ex, namespace), fn)
    assert namespace[fn] is not stubs[fn]
    assert re.search(rf"^✓ {fn}: \d+ cases match$", _run_grader(ex, namespace), re.M)


def test_a_stub_called_by_another_exercise_is_named():
    ex = next(ex for ex in EXERCISES if ex.functions == ("objective_via_pi_r",))
    stubs = _imports(SOLUTIONS[ex.notebook])
    exec(student.stub(next(e for e in EXERCISES if "kl_by_hand" in e.functions).source, 2), stubs)
    namespace = _solved(ex.notebook)
    namespace["kl_by_hand"] = stubs["kl_by_hand"]  # objective_via_pi_r looks it up in this namespace
    expected = "not implemented yet: fill in kl_by_hand (which objective_via_pi_r calls)"
    assert _failure(_run_grader(ex, namespace), "objective_via_pi_r") == expected


def test_an_exercise_that_calls_a_failed_one_runs_on_the_library_version():
    """kl_by_hand left a stub: its check puts the library's KL in its place, so the solved
    objective_via_pi_r, which calls kl_by_hand, passes (without the stand-in it would report kl_by_hand)."""
    (kl,) = [ex for ex in EXERCISES if "kl_by_hand" in ex.functions]
    (objective,) = [ex for ex in EXERCISES if ex.functions == ("objective_via_pi_r",)]
    namespace = _solved(kl.notebook)
    exec(student.stub(kl.source, kl.tier), namespace)  # kl_by_hand and its cell-mate back to stubs
    _failure(_run_grader(kl, namespace), "kl_by_hand")
    assert re.search(r"^✓ objective_via_pi_r: \d+ cases match$", _run_grader(objective, namespace), re.M)


def test_the_committed_student_copies_fail_every_grader():
    """Worked through top to bottom, as a student would: each check reports its own function (the earlier
    ones stand in for the library's by then) and goes on."""
    copies = sorted((NOTEBOOKS / "student").glob("*.ipynb"))
    assert copies
    for path in copies:
        nb = nbformat.read(path, as_version=4)
        namespace = _imports(nb)
        for ex in student.exercises(nb, path.name):
            exec(ex.source, namespace)
            printed = _run_grader(ex, namespace)
            reports = re.findall(r"^✗ (.*)$", printed, re.M)
            assert reports == [f"not implemented yet: fill in {fn}" for fn in ex.functions], printed


# Deliberately wrong solutions: (notebook, description, source). Each must fail its grader on some input.
MUTANTS = [
    ("01", "sign flip: y2 wins", """
def bt_by_hand(reward):
    r1, r2 = reward[:, :, None], reward[:, None, :]
    return np.exp(r2) / (np.exp(r1) + np.exp(r2))
"""),
    ("01", "missing mask: 0 log 0 is nan", """
def kl_by_hand(policy, pi_ref):
    return (policy * np.log(policy / pi_ref)).sum(-1)
"""),
    ("01", "mean instead of sum over y", """
def kl_by_hand(policy, pi_ref):
    safe = np.where(policy > 0, policy, 1.0)
    return (policy * np.log(safe / pi_ref)).mean(-1)
"""),
    ("01", "sign flip on the KL term", """
def rlhf_objective_by_hand(policy, reward, pi_ref, beta):
    return (policy * reward).sum(-1) + beta * kl_by_hand(policy, pi_ref)
"""),
    ("01", "mean instead of sum over y", """
def partition_by_hand(reward, pi_ref, beta):
    return (pi_ref * np.exp(reward / beta)).mean(-1)
"""),
    ("01", "missing term: no division by Z(x)", """
def optimal_policy_by_hand(reward, pi_ref, beta):
    return pi_ref * np.exp(reward / beta)
"""),
    ("01", "beta instead of 1/beta", """
def optimal_policy_by_hand(reward, pi_ref, beta):
    p = pi_ref * np.exp(reward * beta)
    return p / p.sum(-1, keepdims=True)
"""),
    ("01", "sign flip on beta log Z", """
def objective_via_pi_r(policy, reward, pi_ref, beta):
    pi_r = optimal_policy_by_hand(reward, pi_ref, beta)
    return -beta * kl_by_hand(policy, pi_r) - beta * np.log(partition_by_hand(reward, pi_ref, beta))
"""),
    ("01", "missing 1/beta in pi_r and Z", """
def objective_via_pi_r(policy, reward, pi_ref, beta):
    pi_r = optimal_policy_by_hand(reward, pi_ref, 1.0)
    return -beta * kl_by_hand(policy, pi_r) + beta * np.log(partition_by_hand(reward, pi_ref, 1.0))
"""),
    ("01", "sign flip on beta log Z", """
def reward_from_policy(policy, pi_ref, beta, log_z):
    return beta * np.log(policy / pi_ref) - beta * log_z[:, None]
"""),
    ("01", "missing term: beta log Z", """
def reward_from_policy(policy, pi_ref, beta, log_z):
    return beta * np.log(policy / pi_ref)
"""),
    ("01", "sign flip: y1 and y2 swapped", """
def bt_from_policy(policy, pi_ref, beta):
    h = beta * np.log(policy / pi_ref)
    return 1 / (1 + np.exp(h[:, :, None] - h[:, None, :]))
"""),
    ("01", "sign flip: the loss of y_l winning", """
def eq7(logp_w, logp_l, ref_w, ref_l, beta):
    return -torch.nn.functional.logsigmoid(beta * (logp_l - ref_l) - beta * (logp_w - ref_w))
"""),
    ("01", "missing term: no reference log-probs", """
def eq7(logp_w, logp_l, ref_w, ref_l, beta):
    return -torch.nn.functional.logsigmoid(beta * logp_w - beta * logp_l)
"""),
    ("01", "mean instead of the weighted sum", """
def dpo_loss_table(logits, pi_ref, data, beta):
    logp, ref = torch.log_softmax(logits, -1), pi_ref.log()
    x, y_w, y_l = data.x, data.y_w, data.y_l
    return eq7(logp[x, y_w], logp[x, y_l], ref[x, y_w], ref[x, y_l], beta).mean()
"""),
    ("01", "mean instead of sum over positions", """
def pl_nll(r_ranked):
    tail = torch.logcumsumexp(r_ranked.flip(-1), -1).flip(-1)
    return (tail - r_ranked).mean(-1)
"""),
    ("01", "missing mask: denominators over all K, not j >= k", """
def pl_nll(r_ranked):
    return (torch.logsumexp(r_ranked, -1, keepdim=True) - r_ranked).sum(-1)
"""),
    ("02", "sign flip on beta log Z", """
def project_reward_by_hand(reward, pi_ref, beta):
    return reward + beta * torch.logsumexp(pi_ref.log() + reward / beta, -1, keepdim=True)
"""),
    ("02", "overflow: exp(r / beta) outside log space", """
def project_reward_by_hand(reward, pi_ref, beta):
    return reward - beta * torch.log((pi_ref * torch.exp(reward / beta)).sum(-1, keepdim=True))
"""),
    ("02", "missing term: r instead of f(r)", """
def eq10_objective(policy, reward, pi_ref, beta):
    return (policy * (reward - beta * (policy.log() - pi_ref.log()))).sum(-1)
"""),
    ("02", "mean instead of sum over the logits", """
def gradient_variance(logits, bandit, beta, normalise):
    policy = torch.softmax(logits, -1)
    g = bd.reinforce_returns(logits, bandit, beta, normalise=normalise)
    g_hat = (torch.eye(bandit.n_y, dtype=policy.dtype) - policy[:, None, :]) * g[:, :, None]
    mean = (policy[:, :, None] * g_hat).sum(1)
    return (policy * (g_hat**2).mean(-1)).sum(-1) - (mean**2).mean(-1)
"""),
    ("02", "missing term: the squared mean", """
def gradient_variance(logits, bandit, beta, normalise):
    policy = torch.softmax(logits, -1)
    g = bd.reinforce_returns(logits, bandit, beta, normalise=normalise)
    g_hat = (torch.eye(bandit.n_y, dtype=policy.dtype) - policy[:, None, :]) * g[:, :, None]
    return (policy * (g_hat**2).sum(-1)).sum(-1)
"""),
    ("03", "missing shift: logits at t scored against token t", """
def next_token_loss(logits, input_ids, attention_mask):
    token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, :, None]).squeeze(-1)
    return -token_logps[attention_mask.bool()].mean()
"""),
    ("03", "missing shift: the mask is not shifted with the logits", """
def next_token_loss(logits, input_ids, attention_mask):
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return -token_logps[attention_mask[:, :-1].bool()].mean()
"""),
    ("03", "missing mask: padding counted as a target", """
def next_token_loss(logits, input_ids, attention_mask):
    return -logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).mean()
"""),
    ("03", "mean per review, then over reviews: short reviews weigh as much as long ones", """
def next_token_loss(logits, input_ids, attention_mask):
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = attention_mask[:, 1:]
    return -((token_logps * mask).sum(-1) / mask.sum(-1)).mean()
"""),
    ("04", "missing mask: pairs whose r* tie are kept", """
def bt_loss_on_samples(scores, rstar):
    j, k = np.triu_indices(rstar.shape[1], k=1)
    margin = np.sign(rstar[:, j] - rstar[:, k]) * (scores[:, j] - scores[:, k])
    return np.logaddexp(0.0, -margin).mean()
"""),
    ("04", "y_w chosen by the scores, not by r*", """
def bt_loss_on_samples(scores, rstar):
    j, k = np.triu_indices(rstar.shape[1], k=1)
    gap = rstar[:, j] - rstar[:, k]
    margin = np.abs(scores[:, j] - scores[:, k])
    return np.logaddexp(0.0, -margin[gap != 0]).mean()
"""),
    ("04", "pairs across prompts too", """
def bt_loss_on_samples(scores, rstar):
    j, k = np.triu_indices(rstar.size, k=1)
    gap = rstar.ravel()[j] - rstar.ravel()[k]
    margin = np.sign(gap) * (scores.ravel()[j] - scores.ravel()[k])
    return np.logaddexp(0.0, -margin[gap != 0]).mean()
"""),
    ("04", "sign flip: the loss of y_l winning", """
def bt_loss_on_samples(scores, rstar):
    j, k = np.triu_indices(rstar.shape[1], k=1)
    gap = rstar[:, j] - rstar[:, k]
    margin = np.sign(gap) * (scores[:, j] - scores[:, k])
    return np.logaddexp(0.0, margin[gap != 0]).mean()
"""),
    ("04", "sum instead of mean over the pairs", """
def bt_loss_on_samples(scores, rstar):
    j, k = np.triu_indices(rstar.shape[1], k=1)
    gap = rstar[:, j] - rstar[:, k]
    margin = np.sign(gap) * (scores[:, j] - scores[:, k])
    return np.logaddexp(0.0, -margin[gap != 0]).sum()
"""),
    ("05", "missing shift: the mask is not shifted with the logits", """
def logp_sum(logits, ids, comp):
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, :-1]).sum(-1)
"""),
    ("05", "missing shift: logits at t scored against token t", """
def logp_sum(logits, ids, comp):
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, :, None]).squeeze(-1)
    return (token_logps * comp).sum(-1)
"""),
    ("05", "missing log_softmax: raw logits", """
def logp_sum(logits, ids, comp):
    token_logps = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, 1:]).sum(-1)
"""),
    ("05", "mean instead of sum over the completion", """
def logp_sum(logits, ids, comp):
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, 1:]).sum(-1) / comp[:, 1:].sum(-1)
"""),
    ("05", "sign flip: the loss of y_l winning", """
def dpo_losses(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_l - ref_l) - (pi_w - ref_w)))
"""),
    ("05", "missing term: no reference log-probs", """
def dpo_losses(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * (pi_w - pi_l))
"""),
    ("05", "beta outside the log-sigmoid", """
def dpo_losses(pi_w, pi_l, ref_w, ref_l, beta):
    return -beta * F.logsigmoid((pi_w - ref_w) - (pi_l - ref_l))
"""),
    ("05", "missing beta", """
def implicit_rewards(pi_w, pi_l, ref_w, ref_l, beta):
    return pi_w - ref_w, pi_l - ref_l
"""),
    ("05", "sign flip: log pi_ref - log pi", """
def implicit_rewards(pi_w, pi_l, ref_w, ref_l, beta):
    return beta * (ref_w - pi_w), beta * (ref_l - pi_l)
"""),
    ("05", "a tie counted as right: >= instead of >", """
def reward_metrics(r_w, r_l):
    return r_w.mean(), r_l.mean(), (r_w - r_l).mean(), (r_w >= r_l).float().mean()
"""),
    ("05", "sum instead of mean: a count of right pairs", """
def reward_metrics(r_w, r_l):
    return r_w.mean(), r_l.mean(), (r_w - r_l).mean(), (r_w > r_l).float().sum()
"""),
    ("05", "sign flip: KL(pi_ref || pi), the other way round", """
def exact_kl(policy_logits, ref_logits, comp):
    logp, logq = policy_logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
    return ((logq.exp() * (logq - logp)).sum(-1) * comp[:, 1:]).sum(-1)
"""),
    ("05", "missing shift: the mask is not shifted with the logits", """
def exact_kl(policy_logits, ref_logits, comp):
    logp, logq = policy_logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
    return ((logp.exp() * (logp - logq)).sum(-1) * comp[:, :-1]).sum(-1)
"""),
    ("05", "missing term: log p - log q without the weight p", """
def exact_kl(policy_logits, ref_logits, comp):
    logp, logq = policy_logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
    return ((logp - logq).sum(-1) * comp[:, 1:]).sum(-1)
"""),
    ("05", "sign flip: log pi_ref - log pi", """
def sampled_logratio(policy_logits, ref_logits, ids, comp):
    return logp_sum(ref_logits, ids, comp) - logp_sum(policy_logits, ids, comp)
"""),
    ("05", "missing shift: logits at t scored against token t", """
def sampled_logratio(policy_logits, ref_logits, ids, comp):
    logp, logq = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    return ((logp - logq).gather(-1, ids[:, :, None]).squeeze(-1) * comp).sum(-1)
"""),
    ("05", "a tie in the scores counted as wrong", """
def pair_accuracy(scores, rstar):
    j, k = np.triu_indices(scores.shape[1], k=1)
    gap, margin = rstar[:, j] - rstar[:, k], scores[:, j] - scores[:, k]
    keep = gap != 0
    return np.mean(np.sign(margin[keep]) == np.sign(gap[keep]))
"""),
    ("05", "missing mask: pairs whose r* tie are kept", """
def pair_accuracy(scores, rstar):
    j, k = np.triu_indices(scores.shape[1], k=1)
    gap, margin = rstar[:, j] - rstar[:, k], scores[:, j] - scores[:, k]
    return np.mean((np.sign(margin) == np.sign(gap)) + 0.5 * (margin == 0))
"""),
    ("05", "pairs across prompts too", """
def pair_accuracy(scores, rstar):
    j, k = np.triu_indices(scores.size, k=1)
    gap, margin = rstar.ravel()[j] - rstar.ravel()[k], scores.ravel()[j] - scores.ravel()[k]
    keep = gap != 0
    return np.mean((np.sign(margin[keep]) == np.sign(gap[keep])) + 0.5 * (margin[keep] == 0))
"""),
    ("06", "score on the last column, not on the last completion step", """
def ppo_rewards(scores, logps, ref_logps, mask, kl_coef):
    r = -kl_coef * (logps - ref_logps) * mask
    r[:, -1] += scores
    return r
"""),
    ("06", "missing mask: the KL penalty on prompt and padding too", """
def ppo_rewards(scores, logps, ref_logps, mask, kl_coef):
    r = -kl_coef * (logps - ref_logps)
    for i in range(len(scores)):
        r[i, int(mask[i].nonzero().max())] += scores[i]
    return r
"""),
    ("06", "sign flip on the KL penalty", """
def ppo_rewards(scores, logps, ref_logps, mask, kl_coef):
    r = kl_coef * (logps - ref_logps) * mask
    for i in range(len(scores)):
        r[i, int(mask[i].nonzero().max())] += scores[i]
    return r
"""),
    ("06", "forward loop: A_t from A_(t-1)", """
def gae_by_hand(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        steps = mask[i].nonzero().flatten().tolist()
        a, next_v = 0.0, 0.0
        for t in steps:
            a = (rewards[i, t] + gamma * next_v - values[i, t]) + gamma * lam * a
            adv[i, t], next_v = a, values[i, t]
    return adv, (adv + values) * mask
"""),
    ("06", "missing lambda: A_t = delta_t + gamma A_(t+1)", """
def gae_by_hand(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        steps = mask[i].nonzero().flatten().tolist()
        a, next_v = 0.0, 0.0
        for t in reversed(steps):
            a = (rewards[i, t] + gamma * next_v - values[i, t]) + gamma * a
            adv[i, t], next_v = a, values[i, t]
    return adv, (adv + values) * mask
"""),
    ("06", "missing mask: the episode runs on through the padding", """
def gae_by_hand(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        a, next_v = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            a = (rewards[i, t] + gamma * next_v - values[i, t]) + gamma * lam * a
            adv[i, t], next_v = a, values[i, t]
    return adv * mask, (adv + values) * mask
"""),
    ("06", "missing term: returns without V_t", """
def gae_by_hand(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        steps = mask[i].nonzero().flatten().tolist()
        a, next_v = 0.0, 0.0
        for t in reversed(steps):
            a = (rewards[i, t] + gamma * next_v - values[i, t]) + gamma * lam * a
            adv[i, t], next_v = a, values[i, t]
    return adv, adv
"""),
    ("06", "min instead of max: the optimistic bound", """
def clipped_surrogate(logps, old_logps, advantages, mask, eps):
    ratio = (logps - old_logps).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
    loss = (torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()
    return loss, ((clipped > unclipped).float() * mask).sum() / mask.sum()
"""),
    ("06", "missing mask: the mean over every step, padding included", """
def clipped_surrogate(logps, old_logps, advantages, mask, eps):
    ratio = (logps - old_logps).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
    return torch.maximum(unclipped, clipped).mean(), ((clipped > unclipped).float() * mask).sum() / mask.sum()
"""),
    ("06", "clipfrac counts ties: >= instead of >", """
def clipped_surrogate(logps, old_logps, advantages, mask, eps):
    ratio = (logps - old_logps).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / mask.sum()
    return loss, ((clipped >= unclipped).float() * mask).sum() / mask.sum()
"""),
    ("06", "missing mask: 0 * log(1 - 1) is nan", """
def unlikelihood_terms(logp_w, mask_w, logp_l, mask_l):
    return -(logp_w * mask_w).sum(-1), -(torch.log1p(-logp_l.exp()) * mask_l).sum(-1)
"""),
    ("06", "-log p instead of -log(1 - p)", """
def unlikelihood_terms(logp_w, mask_w, logp_l, mask_l):
    return -(logp_w * mask_w).sum(-1), -(logp_l * mask_l).sum(-1)
"""),
    ("06", "sign flip on the pull-up term", """
def unlikelihood_terms(logp_w, mask_w, logp_l, mask_l):
    push_down = -torch.where(mask_l.bool(), torch.log1p(-logp_l.exp()), 0.0).sum(-1)
    return (logp_w * mask_w).sum(-1), push_down
"""),
    ("07", "not strict: an equal reward at a larger KL kept", """
def envelope(kl, reward):
    order = np.lexsort((-np.asarray(reward), np.asarray(kl)))
    xs, ys = [], []
    for i in order:
        if not ys or reward[i] >= ys[-1]:
            xs.append(float(kl[i]))
            ys.append(float(reward[i]))
    return np.array(xs), np.array(ys)
"""),
    ("07", "missing sort: the points in the order given", """
def envelope(kl, reward):
    xs, ys = [], []
    for k, r in zip(kl, reward):
        if not ys or r > ys[-1]:
            xs.append(float(k))
            ys.append(float(r))
    return np.array(xs), np.array(ys)
"""),
    ("07", "missing tie-break: at equal KL the first point, not the best", """
def envelope(kl, reward):
    order = np.argsort(np.asarray(kl), kind="stable")
    xs, ys = [], []
    for i in order:
        if not ys or reward[i] > ys[-1]:
            xs.append(float(kl[i]))
            ys.append(float(reward[i]))
    return np.array(xs), np.array(ys)
"""),
    ("07", "not strict: a tie in KL beats", """
def beaten(ours_kl, ours_reward, theirs_kl, theirs_reward):
    ok, orw = np.asarray(ours_kl), np.asarray(ours_reward)
    return sum(bool(np.any((ok <= k) & (orw > r))) for k, r in zip(theirs_kl, theirs_reward))
"""),
    ("07", "not strict: a tie in reward beats", """
def beaten(ours_kl, ours_reward, theirs_kl, theirs_reward):
    ok, orw = np.asarray(ours_kl), np.asarray(ours_reward)
    return sum(bool(np.any((ok < k) & (orw >= r))) for k, r in zip(theirs_kl, theirs_reward))
"""),
    ("07", "pairs counted, not their points", """
def beaten(ours_kl, ours_reward, theirs_kl, theirs_reward):
    ok, orw = np.asarray(ours_kl), np.asarray(ours_reward)
    return sum(int(np.sum((ok < k) & (orw > r))) for k, r in zip(theirs_kl, theirs_reward))
"""),
]


def _defined(source: str) -> str:
    return re.search(r"def (\w+)", source).group(1)


def _mutant_id(mutant) -> str:
    return f"{mutant[0]}-{_defined(mutant[2])}-{mutant[1].split(':')[0]}"


def test_every_exercise_function_has_a_wrong_solution_below():
    mutated = {(notebook, _defined(source)) for notebook, _, source in MUTANTS}
    graded = {(ex.notebook[:2], fn) for ex, fn in FUNCTIONS
              if ex.notebook[:2] in ("01", "02", "03", "04", "05", "06", "07")}
    assert graded == mutated


@pytest.mark.parametrize("mutant", MUTANTS, ids=_mutant_id)
def test_a_wrong_solution_fails_with_input_expected_and_got(mutant):
    notebook, _, source = mutant
    fn = _defined(source)
    ex = next(ex for ex in EXERCISES if ex.notebook[:2] == notebook and fn in ex.functions)
    namespace = _solved(ex.notebook)
    exec(source, namespace)
    message = _failure(_run_grader(ex, namespace), fn)
    # bandit_cases', lm_cases' or a notebook's own inputs
    label = r"(?:(?:bandit|batch)\(seed=\d, [^)]+\)|[a-z][\w ,]+)"
    assert re.match(rf"{fn} is wrong on input {label}: .+\n  expected: .+\n  got: +.+", message), message


# ----------------------------------------------------------------------------------------------------------
# the generator


def test_student_copies_are_up_to_date(tmp_path):
    assert student.main(["--out", str(tmp_path)]) == 0
    fresh = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    committed = sorted(p.name for p in (NOTEBOOKS / "student").glob("*.ipynb"))
    assert fresh == committed, "notebooks/student/ is out of date: run `make student`"
    assert {name[:2] for name in fresh} >= {"01", "02"}

    def cells(path: Path) -> list[tuple]:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells), f"{path.name}: a student copy has no outputs"
        return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]

    for name in fresh:
        assert cells(tmp_path / name) == cells(NOTEBOOKS / "student" / name), (
            f"notebooks/student/{name} is out of date: run `make student`")


@pytest.mark.parametrize("ex", EXERCISES, ids=_id)
def test_a_stub_keeps_signature_and_docstring_and_nothing_else(ex):
    original = {node.name: node for node in ast.parse(ex.source).body}
    stubbed = ast.parse(student.stub(ex.source, ex.tier)).body
    assert [node.name for node in stubbed] == list(ex.functions)
    for node in stubbed:
        assert ast.dump(node.args) == ast.dump(original[node.name].args)
        assert ast.get_docstring(node) == ast.get_docstring(original[node.name])
        assert len(node.body) == 2 and isinstance(node.body[1], ast.Raise)
        assert f"Exercise: {node.name} (tier {ex.tier})" in ast.unparse(node.body[1])


GOOD = """\
# %% [markdown]
# ### Exercise · tier 2 · twice

# %% tags=["exercise", "tier-2"]
def twice(x):
    \"\"\"2x.\"\"\"
    # a comment that gives the answer away
    return 2 * x

# %%
grade(twice, lambda x: 2 * x, {"one": (1.0,)})
"""


@pytest.mark.parametrize(("broken", "message"), [
    (GOOD.replace('"tier-2"]', '"tier-2", "tier-3"]'), "exactly one of"),
    (GOOD.replace("tier 2 ·", "·"), "heading saying 'tier 2'"),
    (GOOD.replace("grade(twice", "print(twice"), "must call grade"),
    (GOOD.replace('    """2x."""\n', ""), "needs a docstring"),
    (GOOD.replace("def twice(x):", "y = 1\ndef twice(x):"), "only function definitions"),
])
def test_a_badly_marked_exercise_is_refused(broken, message):
    nb = jupytext.reads(GOOD, fmt="py:percent")
    (ex,) = student.exercises(nb, "good.py")
    assert student.stub(ex.source, ex.tier).splitlines()[-1] == (
        '    raise NotImplementedError("Exercise: twice (tier 2)")')
    with pytest.raises(student.ExerciseError, match=re.escape(message)):
        student.exercises(jupytext.reads(broken, fmt="py:percent"), "broken.py")


# ----------------------------------------------------------------------------------------------------------
# the grader's other messages


def test_grade_reports_a_crash_a_missing_return_and_a_shape(capsys):
    cases = bandit_cases("reward", numpy=True)
    reward = cases["bandit(seed=0, 3x5): reward"][0]
    for fn, expected, hint in [
            (_named("oops", lambda r: 1 / 0), r"^✗ oops raised ZeroDivisionError on input bandit", ""),
            (_named("silent", lambda r: None), r"^✗ silent is wrong on .*returned None", ""),
            (_named("flat", lambda r: r), r"shape \(3, 5\) instead of \(3, 5, 5\)(.|\n)*hint: broadcast\n",
             "broadcast")]:
        cell = {"fn": fn, "bd": bd, "cases": cases, "hint": hint, "grade": grade, fn.__name__: fn}
        assert eval("grade(fn, bd.bt_probs, cases, hint=hint)", cell) is None  # a cell shows only the verdict
        printed = capsys.readouterr().out
        assert re.search(expected, printed)
        assert printed.endswith("→ using the library's version so the notebook can go on\n")
        # the cell's name now holds the library's version: numpy for numpy, the exercise's argument names too
        stand_in = cell[fn.__name__]
        assert stand_in is not fn
        np.testing.assert_array_equal(stand_in(reward), bd.bt_probs(torch.tensor(reward)).numpy())
        np.testing.assert_array_equal(stand_in(r=reward), stand_in(reward))
    right = _named("right", lambda r: torch.sigmoid(torch.tensor(r)[:, :, None] - torch.tensor(r)[:, None]))
    cell = {"right": right, "bd": bd, "cases": cases, "grade": grade}
    assert eval("grade(right, bd.bt_probs, cases)", cell) is None and cell["right"] is right
    assert capsys.readouterr().out == "✓ right: 2 cases match\n"


def _named(name: str, fn):
    fn.__name__ = name
    return fn
