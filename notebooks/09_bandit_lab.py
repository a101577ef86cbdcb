# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Lab: finite data, deterministic preferences, and where DPO puts the mass
#
# **Cost:** runs in about 40 s on a 2-core laptop (37–45 s wall and 16 s of CPU, measured with
# `time jupyter execute` on a busy 2-core machine); CPU only, nothing downloaded, no artefacts needed.
#
# The exact bandit of notebooks 01–02 (one prompt, a handful of responses, every sum exact), now fitted on a
# **finite** preference data set. An annotator compares two responses drawn from $\pi_{\rm ref}$ and prefers
# the one with the higher true reward $r^*$, except that each label is flipped with a *noise rate*; some
# responses are *never shown* to the annotator. Four methods fit the same data at the same β:
#
# * **DPO**, the loss of Eq. 7;
# * **cDPO**, DPO with label smoothing ε (Mitchell 2023), i.e. labels assumed flipped with probability ε;
# * **IPO** (Azar et al. 2023, arXiv 2310.12036, Eq. 17), a squared loss on the same log-ratio margin;
# * **two-stage RLHF**: a reward model fitted by Eq. 2, then the exact maximiser of Eq. 3 under it (Eq. 4).
#
# Each is plotted against the exact KL-optimal policy $\pi^*$ of $r^*$ (Eq. 4) and the exact reward–KL
# frontier (Eq. 3, as in notebook 02). The lab shows, exactly, the failure Azar et al. (2023) point out:
# with deterministic preferences DPO's loss has no minimiser, its margins go to infinity whatever β is, and
# the rejected responses' probability is handed to others — including responses the data never showed —
# while IPO's and cDPO's bounded targets keep every margin finite and set by β.
#
# §1 works it out on three responses; §2 builds the lab; §3 is the interactive version (sliders, live kernel
# only); §4 is a grid of static figures for a few slider settings, so the lab also reads without a kernel.

# %% tags=["parameters"]
seed: int = 1  # seeds the bandit (π_ref and r*) and the sampled pairs
n_responses: int = 6  # responses y of the one prompt, numbered best first (r* decreasing)
beta: float = 0.5  # KL coefficient β (Eq. 3), the same for every method
n_pairs: int = 50  # preference pairs in the data set
noise: float = 0.0  # probability that a label is flipped; 0 means deterministic preferences
never_shown: list[int] = [5]  # responses never put in a pair (5 is the worst of six)
label_smoothing: float = 0.1  # cDPO's ε, the flip rate it assumes

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from ipywidgets import FloatLogSlider, FloatSlider, IntSlider, SelectMultiple, interact

from dpo_lab import bandit as bd
from dpo_lab.presets import figures_dir
from dpo_lab.seed import seed_everything

seed_everything(seed)
torch.set_num_threads(1)  # tables of a few numbers: thread hand-offs would cost more than the arithmetic
base = bd.Bandit.random(n_x=1, n_y=n_responses, seed=seed)
toy = bd.Bandit(pi_ref=base.pi_ref, reward=base.reward.sort(-1, descending=True).values)  # y0 is the best
F64 = torch.float64


def show(t: torch.Tensor, digits: int = 4) -> list:
    """Round for printing, so checked outputs do not depend on torch's print format."""
    return (t.numpy().round(digits) + 0.0).tolist()  # + 0.0 turns a rounded -0.0 into 0.0


def margin(policy: torch.Tensor, pi_ref: torch.Tensor, y_w: int, y_l: int) -> float:
    """h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l) on prompt 0: the quantity every loss here sees."""
    u = policy[0].log() - pi_ref[0].log()
    return float(u[y_w] - u[y_l])


print("pi_ref:", show(toy.pi_ref[0]))
print("r*:    ", show(toy.reward[0]))

# %% [markdown]
# ## 1. The failure, on three responses
# One prompt, $\pi_{\rm ref}=(0.5,\,0.3,\,0.2)$, $r^*=(1,\,0,\,-1)$. The data: $y_0\succ y_1$, every time
# (deterministic preferences); $y_2$ is never shown. Every loss below sees only the margin
# $h=\log\frac{\pi(y_0)}{\pi_{\rm ref}(y_0)}-\log\frac{\pi(y_1)}{\pi_{\rm ref}(y_1)}$, and for a pair that $y_w$ wins
# with empirical frequency $\hat p$ (here $\hat p = 1$) its optimum is
#
# | loss | per pair | optimal margin | here |
# |---|---|---|---|
# | DPO, Eq. 7 | $-\log\sigma(\beta h)$ | $\operatorname{logit}(\hat p)/\beta$ | $+\infty$ |
# | cDPO | $-(1-\varepsilon)\log\sigma(\beta h)-\varepsilon\log\sigma(-\beta h)$ | $\operatorname{logit}((1-\varepsilon)\hat p+\varepsilon(1-\hat p))/\beta$ | $\log\frac{1-\varepsilon}{\varepsilon}/\beta$ |
# | IPO, Azar Eq. 17 | $\big(h-\frac{1}{2\beta}\big)^2$ | $(2\hat p-1)/(2\beta)$ | $1/(2\beta)$ |
#
# **Azar et al.'s argument.** The Bradley–Terry model (Eq. 1) can explain $p(y_0\succ y_1)=1$ only
# with an infinite reward gap, and Eq. 4 turns an infinite gap into $\pi(y_1)=0$ *whatever* β is: the KL
# regulariser stops regularising. DPO inherits this: $-\log\sigma(\beta h)$ has infimum 0 and no minimiser, so
# $h\to\infty$. No deterministic annotator is needed for this: with finite data a pair seen once, or always
# labelled the same way, has $\hat p\in\{0,1\}$. IPO regresses $h$ onto the bounded target $(2\hat p-1)/(2\beta)$
# instead of the unbounded $\operatorname{logit}(\hat p)/\beta$, and cDPO caps the target at
# $\operatorname{logit}(1-\varepsilon)/\beta$: finite margins, set by β.
#
# **Where does $y_1$'s mass go?** The loss never mentions $y_2$ and sees only the difference $h$, so
# *every* $(a,\,0,\,1-a)$ with $a\in[0,1]$ is a limit of DPO-minimising sequences: the loss cannot choose.
# Two natural choices, both exact:
# * **the KL anchor**: add $\lambda\,\mathrm{KL}(\pi\|\pi_{\rm ref})$, the regulariser the DPO derivation starts
#   from (Eq. 3), and let $\lambda\to0$. The limit is the member closest to $\pi_{\rm ref}$:
#   $\pi_{\rm ref}$ conditioned on $\{y_0,y_2\}$, i.e. $(5/7,\,0,\,2/7)$, along the path
#   $\theta(t)=\log\pi_{\rm ref}-t\,e_1$ (loss $\log(1+e^{-\beta t})$, strictly decreasing to 0). $y_1$'s share
#   goes to $y_0$ **and to the never-shown $y_2$**, in proportion to $\pi_{\rm ref}$, for every β.
#   `bd.preference_optimum` computes this limit for any data set and any of the three losses.
# * **gradient descent from $\pi_{\rm ref}$** (`bd.solve_dpo`): every gradient is a multiple of $e_0-e_1$, so
#   the iterates stay on $\theta(s)=\log\pi_{\rm ref}+s\,(e_0-e_1)$: $\theta(y_2)$ never moves, and $\pi(y_2)\to0$
#   (all mass to $y_0$). Another member of the same set, picked by the optimiser, not by β.

# %% tags=["nbval-check-output"]
azar = bd.Bandit(pi_ref=torch.tensor([[0.5, 0.3, 0.2]], dtype=F64), reward=torch.tensor([[1.0, 0.0, -1.0]], dtype=F64))
y0_beats_y1 = bd.PreferenceData(x=torch.tensor([0]), y_w=torch.tensor([0]), y_l=torch.tensor([1]),
                                weight=torch.ones(1, dtype=F64))
eps = label_smoothing
for b in (0.1, 0.5, 2.0):
    dpo = bd.preference_optimum(azar.pi_ref, y0_beats_y1, b)
    ipo = bd.preference_optimum(azar.pi_ref, y0_beats_y1, b, loss_type="ipo")
    cdpo = bd.preference_optimum(azar.pi_ref, y0_beats_y1, b, label_smoothing=eps)
    print(f"beta={b}:  pi* = {show(azar.optimal_policy(b)[0])}")
    print(f"  DPO limit  {show(dpo[0], 6)}  (the same for every beta; pi(y2) = 0.2/0.7)")
    print(f"  IPO        {show(ipo[0], 6)}  h = {margin(ipo, azar.pi_ref, 0, 1):.6f} = 1/(2 beta) = {1 / (2 * b):.6f}")
    print(f"  cDPO       {show(cdpo[0], 6)}  h = {margin(cdpo, azar.pi_ref, 0, 1):.6f} = "
          f"log((1-eps)/eps)/beta = {np.log((1 - eps) / eps) / b:.6f}")

# %% [markdown]
# The two paths side by side, and where the L-BFGS solver is after $k$ steps: on the gradient-descent line,
# with ever larger margins the longer it runs (by default it stops once the gradient is below 1e-10).
# Both paths drive the loss to 0; at equal loss they disagree about $\pi(y_2)$ completely.

# %%
b = beta
e0, e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64), torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
log_ref = azar.pi_ref.log()
for steps in (1, 4, 16, 64):
    fit = bd.solve_dpo(azar.pi_ref, y0_beats_y1, b, steps=steps, grad_tol=0.0)
    h = margin(fit.policy, azar.pi_ref, 0, 1)
    on_line = torch.softmax(log_ref + h / 2 * (e0 - e1), -1)  # the gradient-descent line at the same margin
    print(f"L-BFGS {steps:3d} steps: loss {fit.history[-1]['loss']:.2e}  h {h:7.3f}  pi {show(fit.policy[0])}  "
          f"on the line: {bd.max_abs_error(fit.policy, on_line) < 1e-12}")

ts = np.linspace(0, 40, 200)
paths = {"KL anchor: log pi_ref - t e1": [log_ref - t * e1 for t in ts],
         "gradient descent: log pi_ref + (t/2)(e0 - e1)": [log_ref + t / 2 * (e0 - e1) for t in ts]}
fig, ax = plt.subplots(figsize=(6.4, 3.8))
for label, path in paths.items():  # both have margin h = t, hence the same loss at each t
    losses = [float(bd.dpo_loss_on_table(theta, azar.pi_ref, y0_beats_y1, b)[0]) for theta in path]
    ax.plot(losses, [float(torch.softmax(theta, -1)[0, 2]) for theta in path], label=label)
ax.axhline(float(azar.optimal_policy(b)[0, 2]), color="black", ls=":", label=rf"$\pi^*(y_2)$, $\beta$={b}")
ax.axhline(0.2, color="grey", ls="--", lw=0.8, label=r"$\pi_{\rm ref}(y_2)$")
ax.set_xscale("log")
ax.invert_xaxis()
ax.set_xlabel("DPO loss (Eq. 7), falling to its infimum 0 →")
ax.set_ylabel(r"$\pi(y_2)$, the never-shown response")
ax.set_title("Same loss, different policies: DPO cannot say where the mass goes")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figures_dir() / "09_two_limits.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** Read the plot from left to right: along both curves the DPO loss falls towards 0, yet
# $\pi(y_2)$ ends above $\pi_{\rm ref}(y_2)$ (the dashed line) on the blue path and at 0, below $\pi^*(y_2)$
# (the dotted line), on the orange one. Equal loss, different policies: the loss does not decide where the
# never-shown response's mass goes; the optimiser's path does.

# %% [markdown]
# ## 2. The lab
# **Data** (`bd.sample_annotated_preferences`): `n_pairs` pairs $y_1\neq y_2\sim\pi_{\rm ref}$ restricted to the
# shown responses; the one with the higher $r^*$ wins, except with probability `noise`.
#
# **DPO in general.** Draw an arrow $y_w\to y_l$ for every labelled pair and group the responses into strongly
# connected components (within one, each response beats each other through a chain of wins). A component
# that loses to a response outside it is *dominated*: no finite margin zeroes that pair's loss, so its
# probability goes to 0 (`bd.dominated_responses`). With deterministic labels the components are single
# responses and the dominated ones are **every response that loses at least once**. So the DPO limit is
# $\pi_{\rm ref}$ conditioned on the responses that never lose: the never-compared ones and, once every shown
# pair has been drawn, the best shown one; from then on it is the same for every β and every data size.
# Label noise creates cycles (the worse response wins sometimes); once every compared response beats every
# other through some chain of wins, nothing is dominated and DPO's optimum is finite.
#
# **What is plotted**, one bar per method and response:
# * DPO, cDPO, IPO: the exact answer of each loss with the KL anchor of §1 (`bd.preference_optimum`): within
#   each group of compared responses the loss's own optimum (IPO's is a weighted least-squares fit on the
#   comparison graph, `bd.ipo_closed_form`; on a tournament its margins are not all $1/(2\beta)$), and between
#   groups and never-compared responses the split of mass closest to $\pi_{\rm ref}$;
# * RLHF: the reward model of Eq. 2 fitted by L-BFGS from $r=0$, then Eq. 4 in closed form, as in notebook
#   02. On deterministic data its maximum-likelihood reward gaps are infinite too (Eq. 2 is Eq. 7's loss with
#   $r$ in place of $\beta\log\pi/\pi_{\rm ref}$), so L-BFGS stops only once the gradient is below its
#   tolerance, at huge but finite rewards;
# * × markers: DPO trained the same way (L-BFGS from $\pi_{\rm ref}$). Trained alike, DPO and RLHF agree
#   (Theorem 1), but on deterministic data both end at winner-takes-all, a third member of DPO's set.

# %%
METHODS = {"pi*": "black", "DPO": "tab:red", "cDPO": "tab:orange", "IPO": "tab:green", "RLHF": "tab:blue"}


def fit_all(beta_value: float, n_pairs_value: int, noise_value: float,
            hidden: list[int]) -> tuple[dict[str, torch.Tensor], bd.PreferenceData]:
    """Every method's policy on one sampled data set; 'DPO, L-BFGS' is the trained DPO of the × markers."""
    data = bd.sample_annotated_preferences(toy, n_pairs_value, noise=noise_value, never_shown=hidden, seed=seed)
    ref = toy.pi_ref
    return {"pi*": toy.optimal_policy(beta_value),
            "DPO": bd.preference_optimum(ref, data, beta_value),
            "cDPO": bd.preference_optimum(ref, data, beta_value, label_smoothing=label_smoothing),
            "IPO": bd.preference_optimum(ref, data, beta_value, loss_type="ipo"),
            "RLHF": bd.solve_rlhf(ref, data, beta_value).policy,
            "DPO, L-BFGS": bd.solve_dpo(ref, data, beta_value).policy}, data


# %%
frontier = bd.reward_kl_curve(toy, np.geomspace(0.01, 100, 80))


def draw(beta_value: float, n_pairs_value: int, noise_value: float, hidden: list[int],
         axes: tuple[plt.Axes, plt.Axes] | None = None) -> plt.Figure:
    """Left: each method's policy beside π* and π_ref. Right: each method on the exact reward–KL frontier."""
    fits, data = fit_all(beta_value, n_pairs_value, noise_value, hidden)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
    left, right = axes
    ys, width = np.arange(toy.n_y), 0.16
    left.bar(ys, toy.pi_ref[0], width=0.95, color="0.9", label=r"$\pi_{\rm ref}$")
    for i, (name, color) in enumerate(METHODS.items()):
        left.bar(ys + (i - 2) * width, fits[name][0], width=width, color=color, label=name)
    left.plot(ys - width, fits["DPO, L-BFGS"][0], "kx", ms=7, label="DPO, L-BFGS")  # over the DPO bars
    dominated = bd.dominated_responses(data, 1, toy.n_y)[0]
    compared = bd.compared_responses(data, 1, toy.n_y)[0]
    left.set_xticks(ys, [f"y{y}" + ("\nnever shown" if not compared[y] else "\nDPO → 0" if dominated[y] else "")
                         for y in ys], fontsize=8)
    left.set_ylim(0, 1)
    left.set_ylabel("probability")
    unseen = float(fits["DPO"][0, ~compared].sum())
    left.set_title(f"β={beta_value:.3g}, {n_pairs_value} pairs, noise {noise_value:.2f}: DPO puts {unseen:.2f} "
                   f"on never-compared responses (π*: {float(fits['pi*'][0, ~compared].sum()):.3f})", fontsize=9)
    left.legend(fontsize=7, ncol=4)
    right.plot([c[1] for c in frontier], [c[2] for c in frontier], color="0.4", label=r"frontier $\pi^*_\beta$")
    right.plot(*toy.evaluate(toy.pi_ref), "s", color="0.6", label=r"$\pi_{\rm ref}$")
    for name, color in METHODS.items():
        right.plot(*toy.evaluate(fits[name]), "*" if name == "pi*" else "o", color=color, ms=15 if name == "DPO" else 10,
                   mfc="none", mew=2)  # DPO's ring is larger: at small β cDPO lands on it
    right.plot(*toy.evaluate(fits["DPO, L-BFGS"]), "kx", ms=8)
    right.set_xlabel(r"KL$(\pi\,\|\,\pi_{\rm ref})$")
    right.set_ylabel(r"$\mathbb{E}_\pi[r^*]$")
    right.set_xlim(-0.05, max(2.0, 1.1 * max(toy.evaluate(p)[0] for p in fits.values())))
    right.set_title("exact reward–KL frontier (Eq. 3)", fontsize=9)
    fig = right.figure
    fig.tight_layout()
    return fig


# %% [markdown]
# The lab at the notebook's parameters. The numbers under the figure are exact (IPO's and cDPO's optima are
# certified by a vanishing gradient; DPO's limit needs no solver at all), except the two trained by L-BFGS
# (RLHF and "DPO, L-BFGS"), which are where the solver stopped.

# %%
fig = draw(beta, n_pairs, noise, never_shown)
fig.savefig(figures_dir() / "09_bandit_lab.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** The red DPO bars are 0 at every response marked "DPO → 0" (each lost at least once),
# and the never-shown response gets far more than $\pi^*$ gives it (the title prints both). On the right,
# each fit is a circle and the exact frontier a curve: a circle below the curve is a policy that pays more KL
# for its reward than $\pi^*$ does; check how far below DPO's circle sits compared with IPO's and cDPO's.

# %% tags=["nbval-check-output"]
fits, data = fit_all(beta, n_pairs, noise, never_shown)
compared = bd.compared_responses(data, 1, toy.n_y)[0]
print("never compared:", (~compared).nonzero()[:, 0].tolist(),
      " dominated (DPO sends them to 0):", bd.dominated_responses(data, 1, toy.n_y)[0].nonzero()[:, 0].tolist())
for name, policy in {"pi_ref": toy.pi_ref, **fits}.items():
    kl, reward = toy.evaluate(policy)
    print(f"{name:11s} mass on never-compared {float(policy[0, ~compared].sum()):.4f}  KL {kl:.4f}  "
          f"E[r*] {reward:.4f}")
# exact facts behind the figure
torch.testing.assert_close(bd.solve_dpo(toy.pi_ref, data, beta, loss_type="ipo").table - toy.pi_ref.log(),
                           bd.ipo_closed_form(toy.pi_ref, data, beta), atol=1e-7, rtol=0)
if noise == 0:
    keep = toy.pi_ref * ~bd.dominated_responses(data, 1, toy.n_y)
    for b in (0.01, beta, 100.0):  # DPO's limit is π_ref on the never-rejected responses, whatever β
        torch.testing.assert_close(bd.preference_optimum(toy.pi_ref, data, b), keep / keep.sum(), atol=1e-15, rtol=0)

# %% [markdown]
# ## 3. Interactive
# Move the sliders (a live kernel is needed; each redraw refits all methods, a second or two). Things to
# try: β from 0.01 to 10 (the red DPO bars do not move, green and orange do); 2000 pairs instead of 50 (DPO's
# limit still does not move); noise 0.1 to 0.3 (DPO becomes finite once the flipped labels close
# every chain of wins into a cycle); hide the best response, or none.

# %%
# Interactive: the redraws need a live kernel; headless runs (papermill, nbval) only record the widget.
def redraw(beta_value: float, n_pairs_value: int, noise_value: float, hidden: tuple[int, ...]) -> None:
    if toy.n_y - len(hidden) < 2:
        print("show at least two responses")
        return
    draw(beta_value, n_pairs_value, noise_value, list(hidden))
    plt.show()


_ = interact(redraw,
             beta_value=FloatLogSlider(value=beta, base=10, min=-2, max=1, step=0.1, description="β",
                                       continuous_update=False),
             n_pairs_value=IntSlider(value=n_pairs, min=5, max=2000, step=5, description="pairs",
                                     continuous_update=False),
             noise_value=FloatSlider(value=noise, min=0.0, max=0.45, step=0.05, description="noise",
                                     continuous_update=False),
             hidden=SelectMultiple(options=list(range(toy.n_y)), value=tuple(never_shown),
                                   description="never shown"))

# %% [markdown]
# ## 4. The lab without a kernel: four slider settings
# Row by row: a small β; a large β (DPO's limit is unchanged, IPO and cDPO move back towards $\pi_{\rm ref}$);
# 40 times more data (DPO's limit is still unchanged: more deterministic labels only confirm the same
# dominance); label noise 0.2 on the same data size (each shown response now beats each other through some
# chain of wins: nothing is dominated, and DPO's optimum is finite and close to cDPO's).

# %%
settings = [(0.1, 50, 0.0), (2.0, 50, 0.0), (0.5, 2000, 0.0), (0.5, 2000, 0.2)]  # (β, pairs, noise)
fig, grid = plt.subplots(len(settings), 2, figsize=(12, 4.2 * len(settings)),
                         gridspec_kw={"width_ratios": [1.5, 1]})
for row, (b, n, rho) in zip(grid, settings, strict=True):
    draw(b, n, rho, never_shown, axes=tuple(row))
fig.savefig(figures_dir() / "09_bandit_lab_grid.png", dpi=100)
plt.show()

# %% [markdown]
# **What to notice.** The red bars of rows 1–3 are the same, although β and the number of pairs change: with
# deterministic labels DPO's limit depends only on which responses lose (the cell under section 2 asserts
# it for three values of β). Only row 4, with label noise, moves them, towards the orange cDPO bars.

# %% [markdown]
# **Take-aways.**
# * With deterministic preferences, which finite data produce even when the annotator is not deterministic,
#   DPO's loss (Eq. 7) has no minimiser: every response that loses at least once is driven to probability 0,
#   for every β (Azar et al. 2023). β, the only knob meant to keep π near $\pi_{\rm ref}$, has no effect.
# * The loss is blind to where that mass goes. Anchored to $\pi_{\rm ref}$ it goes to every never-rejected
#   response in proportion to $\pi_{\rm ref}$, never-shown ones included, however bad they are: here the worst
#   response ends far above $\pi^*$. Gradient descent on a table happens to send it to the top response
#   instead; a model that shares parameters between responses moves it wherever its parameterisation leads
#   (which a table cannot show).
# * IPO (target margin $1/(2\beta)$ for a consistent pair) and cDPO (target $\log\frac{1-\varepsilon}{\varepsilon}/\beta$)
#   have finite optima: no response is driven to 0, and as β grows they return to $\pi_{\rm ref}$. Label
#   noise does the same for DPO, by making the empirical preferences non-deterministic.
# * Two-stage RLHF has the same problem in its reward model (Theorem 1: the same optimum set). Azar et al.
#   note that practice contains it by regularising the reward model (e.g. early stopping), which this lab
#   does not do.
