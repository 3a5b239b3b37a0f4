"""Write the notebooks of docs/notebooks/ (without outputs) from the cells below.

Run ``python docs/notebooks/build.py`` after editing a cell; the tests execute the notebooks with
``PIMA_QUICK=1`` (small settings) so that the suite stays fast.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = """import os
import numpy as np
import torch

torch.set_num_threads(1)  # small networks: one thread is fastest on shared cores
QUICK = os.environ.get("PIMA_QUICK") == "1"  # the test suite runs the notebooks with small settings"""

TUTORIAL = [
    new_markdown_cell(
        "# The seed's three exercises\n\n"
        "1. Polynomial fitting as maximum likelihood.\n"
        "2. Expectation-maximisation for a mixture of physics experts.\n"
        "3. The product of Gaussian experts."
    ),
    new_code_cell(SETUP),
    new_markdown_cell(
        "## Exercise 1: polynomial fitting is MLE\n\n"
        "With $y_d \\sim \\mathcal N(\\sum_\\alpha c_\\alpha \\phi_\\alpha(x_d), \\sigma^2)$ the negative "
        "log-likelihood is $C + N\\log\\sigma + \\tfrac12\\sum_d (y_d - \\sum_\\alpha c_\\alpha "
        "\\phi_\\alpha(x_d))^2/\\sigma^2$, so the MLE of $c$ is least squares and "
        "$\\hat\\sigma^2$ is the mean squared residual. `Polynomial(d)` with one cluster and "
        "weights 1 is exactly that."
    ),
    new_code_cell(
        """from pima_pyro.models.experts import Polynomial, weighted_least_squares

rng = np.random.default_rng(0)
x = torch.linspace(-1, 1, 50, dtype=torch.float64)
true_c = np.array([0.5, -1.0, 2.0])
y = torch.tensor(np.polyval(true_c[::-1], x.numpy()) + 0.1 * rng.standard_normal(50))
theta, s2 = weighted_least_squares(
    Polynomial(2).design_matrix(x), y[None], torch.ones(1, 1, dtype=torch.float64), ridge=0.0
)
reference = np.polyfit(x.numpy(), y.numpy(), 2)[::-1]
print("MLE coefficients", theta.numpy().round(4), "numpy.polyfit", reference.round(4))
print("MLE noise sd", float(s2.sqrt()))
assert np.allclose(theta.numpy()[0], reference, atol=1e-8)"""
    ),
    new_markdown_cell(
        "## Exercise 2: EM for a mixture of experts\n\n"
        "E-step: $q_{dc} = \\pi_c \\mathcal N(y_d; f(t;\\theta_c), \\sigma_c^2) / \\sum_{c'} \\cdots$. "
        "M-step: $\\pi_c = \\sum_d q_{dc}/N$ and $\\theta_c = \\arg\\min \\sum_d q_{dc} "
        "\\lVert y_d - f(t;\\theta_c)\\rVert^2$ (weighted least squares)."
    ),
    new_code_cell(
        """from pima_pyro.inference.initialization import physics_mixture_em
from pima_pyro.models.experts import Affine

t = torch.linspace(0, 1, 20, dtype=torch.float64)
truth = np.array([[3.0, 0.0], [-2.0, 1.0], [0.5, -1.0]])
labels = rng.integers(0, 3, 300)
curves = torch.tensor(truth[labels, :1] * t.numpy() + truth[labels, 1:] + 0.2 * rng.standard_normal((300, 20)))
em = physics_mixture_em({"y": curves}, {"y": torch.ones(300, dtype=torch.bool)}, {"y": Affine()},
                        {"y": t}, n_clusters=3)
order = np.argsort(em.theta["y"][:, 0].numpy())
print("recovered (slope, intercept):", em.theta["y"].numpy()[order].round(3))
print("true:", truth[np.argsort(truth[:, 0])])
print("weights", em.weights.numpy()[order].round(3), "EM iterations", em.n_iter)"""
    ),
    new_markdown_cell(
        "## Exercise 3: product of Gaussian experts\n\n"
        "$\\sigma^{-2} = \\sum_i \\sigma_i^{-2}$, $\\mu\\sigma^{-2} = \\sum_i \\mu_i\\sigma_i^{-2}$. "
        "Check against the numerically normalised product of densities on a grid."
    ),
    new_code_cell(
        """from pima_pyro.models.poe import poe_posterior

locs = torch.tensor([[[1.0]], [[-0.5]], [[2.0]]], dtype=torch.float64)
log_vars = torch.tensor([[[0.0]], [[-1.0]], [[1.0]]], dtype=torch.float64)
loc, log_var = poe_posterior(locs, log_vars, prior_expert=False)
grid = np.linspace(-10, 10, 200001)
log_density = sum(-0.5 * (grid - m) ** 2 / np.exp(v) for m, v in zip(locs.flatten().numpy(), log_vars.flatten().numpy(), strict=True))
w = np.exp(log_density - log_density.max()); w /= w.sum()
mean = (w * grid).sum(); var = (w * (grid - mean) ** 2).sum()
print("PoE", float(loc), float(log_var.exp()), "numerical", mean, var)
assert abs(mean - float(loc)) < 1e-6 and abs(var - float(log_var.exp())) < 1e-6"""
    ),
]

CRITICISM = [
    new_markdown_cell(
        "# Criticising the digits model\n\n"
        "Posterior predictive checks, PSIS-LOO over the number of clusters K, posterior of the "
        "physics parameters, and NUTS diagnostics."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        """import arviz as az
import pima_pyro as pp
from pima_pyro.criticism import compare_models, plot_physics_bands, ppc_by_cluster

data = pp.datasets.digits_affine(seed=0)
if QUICK:
    data = data.subset(np.arange(400))
epochs = 10 if QUICK else 100
model = pp.PIMA(pp.datasets.affine_modalities(), n_clusters=10, latent_dim=4, bayesian_globals=True)
model.fit(data, epochs=epochs, seed=0, progress=False, prune_clusters=False)  # NUTS below needs every cluster
tree = model.to_datatree(data, num_samples=100 if QUICK else 500, latents=True)
tree"""
    ),
    new_markdown_cell("## Posterior predictive check of the curves, per cluster"),
    new_code_cell(
        """ppc = ppc_by_cluster(tree, "curve")
print(ppc.to_dataframe().round(3))"""
    ),
    new_markdown_cell(
        "## Posterior predictive check of the pixels\n\n"
        "Digit pixels lie in [0, 1] and pile up at 0 and 1. A Gaussian of scale 0.5 replicates "
        "values far outside [0, 1]; the censored normal (`GaussianModality(bounds=(0, 1))`) puts "
        "that mass on the bounds, where the observed pixels are."
    ),
    new_code_cell(
        """from pima_pyro.criticism import plot_value_ppc, value_ppc

print("Gaussian pixels:", value_ppc(tree, "image"))
plot_value_ppc(tree, "image", label="(Gaussian, scale 0.5)")
censored_specs = {
    "image": pp.GaussianModality(scale=0.5, bounds=(0.0, 1.0)),
    "curve": pp.PhysicsModality(expert=pp.LinearThroughOrigin()),
}
censored = pp.PIMA(censored_specs, n_clusters=10, latent_dim=4)
censored.fit(data, epochs=epochs, seed=0, progress=False)
censored_tree = censored.to_datatree(data, num_samples=50, num_importance=2)
print("censored pixels:", value_ppc(censored_tree, "image"))
plot_value_ppc(censored_tree, "image", label="(censored to [0, 1])");"""
    ),
    new_markdown_cell("## Physics parameters: posterior draws and credible bands"),
    new_code_cell(
        """idata = pp.inference.export.to_arviz(tree)
print(az.summary(idata, var_names=["curve_theta"], kind="stats").round(3))
plot_physics_bands(tree, "curve", pp.LinearThroughOrigin());"""
    ),
    new_markdown_cell(
        "## PSIS-LOO over K\n\n"
        "`total` is log p(every observed modality of a sample | the draw of the globals), "
        "marginal over the cluster (exactly) and the latent z (importance sampling); with "
        "Bayesian globals the draws come from their posterior, so LOO on `total` compares the "
        "models on everything observed."
    ),
    new_code_cell(
        """trees = {}
for k in ([8, 10] if QUICK else [8, 9, 10, 11, 12]):
    m = pp.PIMA(pp.datasets.affine_modalities(), n_clusters=k, latent_dim=4, bayesian_globals=True)
    m.fit(data, epochs=epochs, seed=0, progress=False, prune_clusters=False)  # K as given
    trees[f"K={k}"] = m.to_datatree(data, num_samples=100 if QUICK else 400, posterior_predictive=False)
comparison = compare_models(trees, var_name="total")
comparison"""
    ),
    new_markdown_cell("## NUTS on the physics mixture: r_hat and ESS"),
    new_code_cell(
        """draws = 30 if QUICK else 500
result = model.sample_physics_posterior(data, num_samples=draws, warmup_steps=draws,
                                        num_chains=2 if QUICK else 4)
mcmc_idata = result.to_arviz()  # InferenceData on ArviZ 0.x, a DataTree on 1.x
print(az.summary(mcmc_idata, var_names=["curve_theta"])[["mean", "sd", "ess_bulk", "r_hat"]])
print("divergences:", int(result.sample_stats["diverging"].sum()))"""
    ),
]

APPLICATION = [
    new_markdown_cell(
        "# Lattices: images replace uniaxial tests\n\n"
        "Train on images and stress-strain curves; then identify the population and predict the "
        "curve from the image alone."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        """import matplotlib.pyplot as plt
import pima_pyro as pp
from pima_pyro.metrics import matched_accuracy, relative_l2

data = pp.datasets.lattice(n_per_population=80 if QUICK else 150, seed=0)
train, test = data.train_test_split(0.3, seed=0)
model = pp.PIMA(pp.datasets.lattice_modalities(), n_clusters=2, latent_dim=4)
model.fit(train, epochs=60 if QUICK else 100, batch_size=32, seed=0, progress=False)
accuracy, _ = matched_accuracy(test.labels.numpy(), model.predict_clusters(test, given=["image"]))
print("population accuracy from the image alone:", accuracy)
print("per-cluster (E, yield strain, H):", model.physics_parameters()["curve"]["theta"].round(3))"""
    ),
    new_code_cell(
        """pred = model.predict(test, given=["image"], target="curve")
print("relative L2 of the curve predicted from the image:",
      relative_l2(pred.mean.numpy(), test.values["curve"].numpy()))
t = test.grids["curve"].numpy()
fig, axes = plt.subplots(1, 3, figsize=(10, 3))
for ax, n in zip(axes, range(3), strict=True):
    ax.plot(t, test.values["curve"][n], ".", label="measured")
    ax.plot(t, pred.mean[n], label="predicted from image")
    ax.fill_between(t, pred.lower[n], pred.upper[n], alpha=0.3, label="90% interval")
axes[0].legend(fontsize=7);"""
    ),
]

DESIGN = [
    new_markdown_cell(
        "# Choosing the next measurement\n\n"
        "A self-driving lab images every sample but can afford the expensive measurement (here "
        "the curve) for few. Which sample should it measure next? The model answers with the "
        "expected information gain (EIG) about each sample's cluster,\n\n"
        "$$\\mathrm{EIG}_n = \\mathbb H[p(c \\mid x_n)] - \\mathbb E_{y \\sim p(y \\mid x_n)} "
        "\\mathbb H[p(c \\mid x_n, y)],$$\n\n"
        "exact over the cluster c and Monte Carlo over the predicted curve y, with its standard "
        "error. Uncertainty sampling (the entropy $\\mathbb H[p(c \\mid x_n)]$, an upper bound "
        "of the EIG) and random choice are the baselines."
    ),
    new_code_cell(SETUP),
    new_code_cell(
        """import matplotlib.pyplot as plt
import pima_pyro as pp
from pima_pyro.design import measurement_loop, with_known
from pima_pyro.inference.design import select_batch
from pima_pyro.metrics import matched_accuracy

data = pp.datasets.digits_affine(seed=0)
train, test = data.train_test_split(0.3, seed=0)
if QUICK:  # the test suite's setting: a third of the samples
    train = train.subset(np.arange(500))
rng = np.random.default_rng(0)
known = np.zeros(train.n_samples, dtype=bool)
known[rng.choice(train.n_samples, int(0.1 * train.n_samples), replace=False)] = True
current = with_known(train, "curve", known)
epochs = 10 if QUICK else 60
model = pp.PIMA(pp.datasets.affine_modalities(), n_clusters=10, latent_dim=4)
model.fit(current, epochs=epochs, seed=0, progress=False, logger=False)
accuracy, _ = matched_accuracy(test.labels.numpy(), model.predict_clusters(test, given=["image"]))
print(f"curves measured: {known.mean():.0%}; image-only test accuracy {accuracy:.3f}")"""
    ),
    new_markdown_cell(
        "## EIG against uncertainty\n\n"
        "Every sample without a curve gets an EIG with its Monte-Carlo standard error. The EIG "
        "never exceeds the entropy: a curve can at most remove the uncertainty about c. It falls "
        "below it where the candidate clusters have curves that look alike, so that measuring "
        "would not settle the question."
    ),
    new_code_cell(
        """eig, se = model.expected_information_gain(current, measure="curve", given=["image"],
                                          num_samples=128, return_se=True)
entropy = model.cluster_entropy(current, given=["image"])
todo = ~known
print("largest standard error:", float(se[todo].max()).__round__(4))
assert np.all(eig[todo] <= entropy[todo] + 4 * se[todo] + 1e-6)
fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(entropy[todo], eig[todo], s=5)
ax.plot([0, np.log(10)], [0, np.log(10)], "k--", lw=1, label="EIG = entropy")
ax.set_xlabel("entropy of p(c | image) (nats)")
ax.set_ylabel("EIG of measuring the curve (nats)")
ax.legend();"""
    ),
    new_markdown_cell(
        "## A batch of measurements\n\n"
        "A lab measures several samples per round. Taking the b highest scores would pick b "
        "near-duplicates (the same confusion, say between a 4 and a 9). `select_batch` picks "
        "greedily and discounts each candidate by its largest Bhattacharyya overlap "
        "$\\sum_c \\sqrt{p_c q_c}$ with a sample already picked."
    ),
    new_code_cell(
        """candidates = np.flatnonzero(todo)
probs = model.cluster_posterior(current, given=["image"])[candidates]
batch = candidates[select_batch(np.clip(eig[candidates], 0, None), probs, 10)]
top = candidates[np.argsort(-eig[candidates])[:10]]
print("most probable cluster of the 10 best by EIG:   ", probs[np.isin(candidates, top)].argmax(1))
print("most probable cluster of the 10 picked greedily:", probs[np.isin(candidates, batch)].argmax(1))"""
    ),
    new_markdown_cell(
        "## The measurement loop\n\n"
        "`measurement_loop` measures a batch per round (in a simulation it unmasks the curve the "
        "data set already holds), refits warm-started from the previous model and records the "
        "image-only test accuracy. `benchmarks/active_learning.py` runs it over 5 seeds from 5% "
        "to 50% of the curves; this is one seed, a few rounds."
    ),
    new_code_cell(
        """def evaluate(model):
    accuracy, _ = matched_accuracy(test.labels.numpy(), model.predict_clusters(test, given=["image"]))
    return {"image_only": accuracy}


rounds = 1 if QUICK else 4
histories = {}
for strategy in ("eig", "random") if QUICK else ("eig", "entropy", "random"):
    torch.manual_seed(0)
    learner = pp.PIMA(pp.datasets.affine_modalities(), n_clusters=10, latent_dim=4)
    histories[strategy] = measurement_loop(
        learner, train, "curve", known, strategy, batch=int(0.05 * train.n_samples),
        rounds=rounds, evaluate=evaluate, fit_options={"epochs": epochs, "seed": 0},
    )
fig, ax = plt.subplots(figsize=(5, 3))
for strategy, history in histories.items():
    ax.plot([r["fraction"] for r in history], [r["image_only"] for r in history], "o-",
            label=strategy)
ax.set_xlabel("fraction of curves measured")
ax.set_ylabel("image-only test accuracy")
ax.legend();"""
    ),
    new_markdown_cell(
        "## Information about the physics\n\n"
        "With `bayesian_globals=True` the model also knows how uncertain each cluster's physics "
        "parameters are. `about=\"physics\"` scores a sample by what its curve would teach about "
        "its cluster's parameters, $\\sum_c p(c \\mid x_n)\\, \\tfrac12 \\log\\det(I + "
        "s_c^{-2} D_c J_c^\\top J_c D_c)$ (a Gaussian update linearised at the guide's mean, "
        "exact for a slope): it prefers samples of the clusters whose slope is known worst."
    ),
    new_code_cell(
        """bayes = pp.PIMA(pp.datasets.affine_modalities(), n_clusters=10, latent_dim=4,
                bayesian_globals=True)
bayes.fit(current, epochs=epochs, seed=0, progress=False, logger=False)
from pima_pyro.inference.design import physics_parameter_gain

physics_gain = bayes.expected_information_gain(current, about="physics", given=["image"])
per_cluster = physics_parameter_gain(bayes.module, "curve").numpy()
members = np.bincount(bayes.predict_clusters(current)[known], minlength=10)
best = candidates[np.argmax(physics_gain[candidates])]
print("curves measured per cluster:        ", members)
print("gain of one more curve per cluster: ", per_cluster.round(3))
print("cluster of the sample with the most to teach about the physics:",
      int(bayes.predict_clusters(current, given=["image"])[best]))"""
    ),
]


def write(name: str, cells: list) -> None:
    notebook = new_notebook(cells=cells)
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{index}"  # stable ids: a rebuild changes nothing it need not
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    write("01_seed_exercises.ipynb", TUTORIAL)
    write("02_criticism_digits.ipynb", CRITICISM)
    write("03_application_lattice.ipynb", APPLICATION)
    write("04_choosing_the_next_measurement.ipynb", DESIGN)
