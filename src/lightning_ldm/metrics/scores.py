"""KID, Inception Score and precision/recall from features, computed by torch-fidelity's own functions so the
numbers are the ones its ``calculate_metrics`` gives on the same features (input1 = generated, input2 = real).

- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.
- Inception Score (Salimans et al. 2016): exp E KL(p(y|x) || p(y)) from Inception's unbiased logits, in splits.
- Precision/recall (Kynkaanniemi et al. 2019): k-NN manifolds (k = 3) in the extractor's feature space. NB:
  torch-fidelity's own default for them is VGG16 fc2 features; here they use the configured extractor's.
"""

from typing import Any, Optional, Sequence

import torch

# torch-fidelity's default seed for KID subsets and IS shuffling: keeping it makes results match its CLI.
RNG_SEED = 2020


def kernel_inception_distance(generated: torch.Tensor, real: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = RNG_SEED) -> dict[str, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(generated), len(real))
    out = kid_features_to_metric(generated.cpu(), real.cpu(), kid_subsets=subsets, kid_subset_size=size,
                                 rng_seed=seed, verbose=False)
    return {"mean": out[KEY_METRIC_KID_MEAN], "std": out[KEY_METRIC_KID_STD], "subsets": subsets, "subset_size": size}


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = RNG_SEED) -> dict[str, float]:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    splits = max(1, min(splits, len(logits)))
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {"mean": out[KEY_METRIC_ISC_MEAN], "std": out[KEY_METRIC_ISC_STD], "splits": splits}


def precision_recall(generated: torch.Tensor, real: torch.Tensor, neighborhood: int = 3) -> dict[str, float]:
    from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL, \
        prc_features_to_metric

    # save_cpu_ram: distances in blocks of 10k rows, never the full n x n matrix (50k^2 floats = 10 GB).
    out = prc_features_to_metric(generated, real.to(generated.device), prc_neighborhood=neighborhood,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL],
            "f_score": out[KEY_METRIC_F_SCORE], "neighborhood": neighborhood}


def distribution_metrics(features: torch.Tensor, reference, *, label: str, logits: Optional[torch.Tensor] = None,
                         extra: Sequence[str] = (), kid_subsets: int = 100, kid_subset_size: int = 1000,
                         prc_neighborhood: int = 3) -> dict[str, Any]:
    """``{label}@{n}`` (fid or fd-<name>) and the ``extra`` metrics ("kid", "is", "prc") of ``features``
    against ``reference`` (a ``reference.Reference``). Scalars are flat keys, e.g. ``kid@1000`` (mean) with
    ``kid@1000_std``. KID and precision/recall from a non-standard extractor are labelled ``kd-<name>`` and
    ``precision-<name>`` like the Frechet distance."""
    from lightning_ldm.metrics.frechet import distance_to_reference

    n = len(features)
    suffix = "" if label == "fid" else "-" + label[len("fd-"):]
    out: dict[str, Any] = {f"{label}@{n}": distance_to_reference(reference.statistics, features)}
    if "kid" in extra:
        kid = kernel_inception_distance(features, reference.features, kid_subsets, kid_subset_size)
        name = "kid" if label == "fid" else f"kd{suffix}"
        out[f"{name}@{n}"], out[f"{name}@{n}_std"] = kid["mean"], kid["std"]
    if "is" in extra and logits is not None:
        score = inception_score(logits)
        out[f"is@{n}"], out[f"is@{n}_std"] = score["mean"], score["std"]
    if "prc" in extra:
        prc = precision_recall(features, reference.features, prc_neighborhood)
        out[f"precision{suffix}@{n}"], out[f"recall{suffix}@{n}"] = prc["precision"], prc["recall"]
    return out
