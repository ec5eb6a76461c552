"""What a network runs, in which order: found with forward hooks, not from registration order.

Also BatchNorm folding (a BatchNorm whose input is exactly a convolution's output, run right after
it, is merged into that convolution) and module swapping by dotted name.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from monai_effq.solver.layers import SUPPORTED_LAYERS
from monai_effq.utils.errors import UserInputError

__all__ = [
    "BATCHNORMS",
    "NetworkProbe",
    "StopForward",
    "execution_order",
    "find_foldable_batchnorms",
    "fold_batchnorm",
    "forward_graph",
    "graph_readers",
    "probe_network",
    "set_submodule",
    "shape_refusal",
    "hooks",
    "unique_state_dict",
]

logger = logging.getLogger("monai_effq")

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""The normalisations that fold into the convolution before them (PTQ) or freeze (QAT)."""


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activation has been seen."""


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove every hook handle in ``handles`` when the block ends, whatever happens."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name, and under every other name the network holds it by.

    A network may register one module under several names and run it through either: nnU-Net's
    blocks (``dynamic_network_architectures``' ``ConvDropoutNormReLU``) hold their convolution as
    ``conv`` and as ``all_modules[0]`` and run the second. Replaced at one name only, the forward would
    still run the original, and a "quantized" network would compute in floating point.

    Args:
        root: the network.
        name: dotted name of the module to replace.
        module: the replacement.
    """
    if not name:
        raise ValueError("set_submodule replaces a submodule: name one (a dotted name), not the network itself.")
    old = root.get_submodule(name)
    # found before the first replacement: the replacement may hold the old module (a quantized layer wraps it)
    aliases = [(owner, key) for owner in root.modules() for key, child in owner._modules.items() if child is old]
    for owner, key in aliases:
        setattr(owner, key, module)


def unique_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """A network's state dict with each tensor once, under the first name it has.

    A module registered under several names (see :func:`set_submodule`) puts its tensors in
    ``state_dict()`` under each of them; counted or stored once per name they would be counted or
    stored twice.

    Args:
        network: the network.

    Returns:
        ``{name: tensor}`` in ``state_dict()`` order (detached), without the later names of a tensor.
    """
    seen: set[int] = set()
    unique = {}
    for key, t in network.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            unique[key] = t.detach()
    return unique


def _run(network: nn.Module, batch: torch.Tensor | tuple) -> None:
    with torch.no_grad():
        try:
            network(*batch) if isinstance(batch, tuple) else network(batch)
        except StopForward:
            pass


def _record(sizes: dict[str, int], name: str, out: torch.Tensor) -> None:
    sizes.setdefault(name, out.numel())  # returns None: a forward hook must not replace the output


def execution_order(
    network: nn.Module,
    batch: torch.Tensor,
    predicate: Callable[[nn.Module], bool] | None = None,
    output_numels: dict[str, int] | None = None,
) -> list[str]:
    """Names of the modules ``predicate`` selects, in the order one forward pass runs them.

    Args:
        network: the network.
        batch: an input it accepts.
        predicate: which modules to record (default: the supported weight layers).
        output_numels: if given, filled with each recorded module's output size (same pass).

    Returns:
        dotted names, each once, in first-call order (modules never called are left out).
    """
    predicate = predicate or (lambda m: isinstance(m, SUPPORTED_LAYERS))
    order: list[str] = []
    handles: list = []
    with hooks(handles):
        for name, module in network.named_modules():
            if name and predicate(module):
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: order.append(n)))
                if output_numels is not None:
                    handles.append(module.register_forward_hook(lambda m, a, o, n=name: _record(output_numels, n, o)))
        _run(network, batch)
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


@dataclass
class NetworkProbe:
    """What one forward pass shows about a network.

    Attributes:
        output: its output on the probe batch.
        order: the supported weight layers' dotted names, in first-call order.
        output_numels: each of those layers' output size on the probe batch.
        foldable: ``(conv, batchnorm)`` name pairs where the BatchNorm runs right after the conv on
            its output.
        input_layers: the supported weight layers that read the network's input tensor itself (a
            residual unit's first convolution and its shortcut both do), in first-call order.
        calls: the layers that run more than once in one forward pass (one module applied to several
            inputs), with how many times.
        unreplaceable: the layers a quantized layer cannot stand in for, with why: a class of the
            user's with a ``forward`` of its own (weight standardisation), or a call with arguments
            beyond the input (``ConvTranspose3d``'s ``output_size``).
    """

    output: torch.Tensor
    order: list[str]
    output_numels: dict[str, int]
    foldable: list[tuple[str, str]]
    input_layers: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    unreplaceable: dict[str, str] = field(default_factory=dict)


def shape_refusal(error: BaseException) -> str:
    """Why a network refused an input's shape, in the network's own words: the layer's first line names the sizes."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _missing_batch_axis(network: nn.Module, batch: torch.Tensor) -> str:
    """A hint when ``batch`` has one axis fewer than the network's first convolution takes (a volume without its batch axis)."""
    conv = next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None or batch.dim() != len(conv.kernel_size) + 1:
        return ""
    return f"it has {batch.dim()} axes where the network's {type(conv).__name__} takes {batch.dim() + 1}: add the batch axis (volume[None]); "


def probe_network(network: nn.Module, batch: torch.Tensor, shape: tuple[int, ...] | None = None) -> NetworkProbe:
    """Run ``network`` once with hooks that record what preparing it for quantization needs.

    One pass instead of one each for checking that it runs, finding the execution order and the
    output sizes, and finding the BatchNorms to fold.

    Args:
        network: the network (in eval mode).
        batch: an input it accepts.
        shape: the shape to name when the network refuses it (the caller's whole batch, when ``batch`` is its
            first sample); ``batch``'s by default.

    Returns:
        the :class:`NetworkProbe`.

    Raises:
        UserInputError: when the batch does not fit the network (its own message says why).
        TypeError: when the network does not return one tensor.
    """
    order: list[str] = []
    numels: dict[str, int] = {}
    events: list[tuple[str, str, int]] = []  # (name, "in"/"out", id of the tensor)
    reads_input: set[str] = set()
    unreplaceable: dict[str, str] = {}
    handles: list = []
    with hooks(handles):
        for name, module in network.named_modules():
            if name and isinstance(module, SUPPORTED_LAYERS):
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: order.append(n)))
                handles.append(module.register_forward_hook(lambda m, a, o, n=name: _record(numels, n, o)))
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: _reads(reads_input, n, a, batch)))
                handles.append(module.register_forward_pre_hook(lambda m, a, kw, n=name: _extra_arguments(unreplaceable, n, a, kw), with_kwargs=True))
                own = _own_forward(module)
                if own:
                    unreplaceable[name] = own
            if isinstance(module, nn.modules.conv._ConvNd):
                handles.append(module.register_forward_hook(lambda m, a, o, n=name: events.append((n, "out", id(o)))))
            elif isinstance(module, BATCHNORMS):
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: events.append((n, "in", id(a[0])))))
        try:
            with torch.no_grad():
                output = network(batch)
        except Exception as e:
            raise UserInputError(
                f"calibration batch of shape {tuple(batch.shape) if shape is None else tuple(shape)} does not fit the network "
                f"({shape_refusal(e)}); {_missing_batch_axis(network, batch)}pass batches shaped (N, C, *spatial) as the "
                "network expects, with spatial sizes that are multiples of its downsampling factor."
            ) from e
    if not isinstance(output, torch.Tensor):
        kind = f"a {type(output).__name__} of {len(output)}" if isinstance(output, (list, tuple, dict)) else type(output).__name__
        raise TypeError(
            f"the network must return one tensor of logits to be quantized, but it returns {kind}: wrap it in a module "
            "whose forward returns the segmentation logits (e.g. the last tensor of BasicUNetPlusPlus's list)."
        )
    seen: set[str] = set()
    unique = [n for n in order if not (n in seen or seen.add(n))]
    repeated = {n: count for n, count in Counter(order).items() if count > 1}
    ran = set(unique)
    unreplaceable = {n: why for n, why in unreplaceable.items() if n in ran}
    # a BatchNorm folded into the weight a layer's own forward transforms (standardises) would be undone
    foldable = [(conv, norm) for conv, norm in _adjacent_pairs(events) if conv not in unreplaceable]
    return NetworkProbe(output, unique, numels, foldable, [n for n in unique if n in reads_input], repeated, unreplaceable)


def _own_forward(module: nn.Module) -> str | None:
    """Why a supported layer's class computes otherwise than the torch layer it derives from, or ``None``."""
    base = next(cls for cls in SUPPORTED_LAYERS if isinstance(module, cls))
    if type(module).forward is base.forward:
        return None
    return f"its class {type(module).__name__} has a forward of its own, where a quantized layer runs {base.__name__}'s"


def _extra_arguments(names: dict[str, str], name: str, args: tuple, kwargs: dict) -> None:
    if len(args) > 1 or kwargs:  # returns None: a pre-hook must not replace the input
        given = [f"{len(args) - 1} more positional argument(s)"] if len(args) > 1 else []
        names.setdefault(name, f"it is called with {', '.join(given + [f'{k}=' for k in kwargs])}, which a quantized layer does not take")


def _reads(names: set[str], name: str, args: tuple, batch: torch.Tensor) -> None:
    if args and args[0] is batch:  # returns None: a pre-hook must not replace the input
        names.add(name)


def _adjacent_pairs(events: list[tuple[str, str, int]]) -> list[tuple[str, str]]:
    return [(p[0], c[0]) for p, c in zip(events, events[1:]) if p[1] == "out" and c[1] == "in" and p[2] == c[2]]


def find_foldable_batchnorms(network: nn.Module, batch: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` name pairs where the BatchNorm runs right after the conv on its output.

    Args:
        network: the network (in eval mode).
        batch: an input it accepts.

    Returns:
        the pairs that can be folded.
    """
    return probe_network(network, batch).foldable


@dataclass
class _Fold:
    """One BatchNorm folded into its convolution, with what undoing it needs."""

    conv_name: str
    bn_name: str
    weight: torch.Tensor
    bias: nn.Parameter | None
    bn: nn.Module


def _fold_pair(network: nn.Module, conv_name: str, bn_name: str) -> _Fold:
    """Fold one BatchNorm into the convolution before it (in place) and return how to undo it."""
    conv, bn = network.get_submodule(conv_name), network.get_submodule(bn_name)
    fold = _Fold(conv_name, bn_name, conv.weight.detach().clone(), conv.bias, bn)
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    weight = conv.weight
    if transposed:  # (c_in, c_out/g, *k) as (c_in/g, c_out, *k): torch's fusion scales axis 1
        g = conv.groups
        weight = weight.reshape(g, -1, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape[0] // g, -1, *weight.shape[2:])
    fused_w, fused_b = fuse_conv_bn_weights(
        weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
        bn.weight if bn.affine else None, bn.bias if bn.affine else None, transpose=transposed,
    )
    if transposed:
        fused_w = fused_w.reshape(-1, conv.groups, *conv.weight.shape[1:]).transpose(0, 1).reshape(conv.weight.shape)
    conv.weight.copy_(fused_w)
    conv.bias = nn.Parameter(fused_b.detach())
    set_submodule(network, bn_name, nn.Identity())
    return fold


def _unfold(network: nn.Module, folds: list[_Fold]) -> None:
    """Undo ``folds`` (in place), last first."""
    for fold in reversed(folds):
        conv = network.get_submodule(fold.conv_name)
        conv.weight.copy_(fold.weight)
        conv.bias = fold.bias
        set_submodule(network, fold.bn_name, fold.bn)


def _folds_keep_output(
    network: nn.Module, batch: torch.Tensor, reference: torch.Tensor, atol: float, pairs: list[tuple[str, str]]
) -> bool:
    """Fold ``pairs`` and keep them if the output on ``batch`` stays ``reference``; else undo them."""
    folds: list[_Fold] = []
    try:
        for conv, bn in pairs:
            folds.append(_fold_pair(network, conv, bn))
        if torch.allclose(network(batch), reference, atol=atol):
            return True
    except BaseException:
        _unfold(network, folds)
        raise
    _unfold(network, folds)
    return False


def _fold_checked(
    network: nn.Module, batch: torch.Tensor, reference: torch.Tensor, atol: float,
    pairs: list[tuple[str, str]], known_to_fail: bool = False,
) -> tuple[list[str], list[str]]:
    """Fold ``pairs``, keeping a fold only where the output on ``batch`` stays ``reference``.

    Halving a failing set finds the folds that change the output in about ``log2(len(pairs))``
    passes each.

    Args:
        network: the network (modified in place).
        batch: the input of the check.
        reference: the unfolded network's output on ``batch``.
        atol: the check's absolute tolerance.
        pairs: ``(conv, batchnorm)`` names to fold.
        known_to_fail: the whole set is known to change the output, so its own pass is skipped.

    Returns:
        the folded and the refused BatchNorms' names, each in the order of ``pairs``.
    """
    if not pairs:
        return [], []
    if not known_to_fail and _folds_keep_output(network, batch, reference, atol, pairs):
        return [bn for _, bn in pairs], []
    if len(pairs) == 1:
        return [], [pairs[0][1]]
    half = len(pairs) // 2
    folded, refused = _fold_checked(network, batch, reference, atol, pairs[:half])
    # when the first half folds whole, the failure lies in the second: its own first pass would only repeat that
    more = _fold_checked(network, batch, reference, atol, pairs[half:], known_to_fail=not refused)
    return folded + more[0], refused + more[1]


def forward_graph(network: nn.Module, batch: torch.Tensor) -> torch.Tensor | None:
    """``network``'s output on ``batch`` with autograd's graph recorded but no tensors saved for a backward pass.

    The graph's nodes tell which operations read which results (forward hooks see modules only, not
    the additions a residual skip makes), at the memory of an inference pass. Run hooks around it
    to catch the nodes of the tensors of interest (``tensor.grad_fn``).

    Args:
        network: the network (in the mode it is to be read in).
        batch: an input it accepts; a non-leaf copy that requires grad is what runs, as an in-place
            operation on the input would refuse a leaf.

    Returns:
        the output, or ``None`` when there is no graph to read: an operation autograd refuses (in
        place on a view), a forward pass under ``torch.no_grad``, an output that is not a tensor or
        has no graph (an argmax).
    """
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda t: t):
            output = network(batch.detach().requires_grad_(True).clone())
    except Exception as e:  # the callers' numerical checks then decide alone
        logger.debug("no autograd graph to read (%s: %s)", type(e).__name__, e)
        return None
    return output if isinstance(output, torch.Tensor) and output.grad_fn is not None else None


def graph_readers(output: torch.Tensor) -> Counter:
    """How many operations read each autograd node that ``output`` depends on (its own node read once).

    Args:
        output: a tensor from :func:`forward_graph`.

    Returns:
        node -> readers, for every node reachable from ``output.grad_fn``.
    """
    readers: Counter = Counter({output.grad_fn: 1})
    stack = [output.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is not None:
                readers[node] += 1
                if readers[node] == 1:
                    stack.append(node)
    return readers


def _read_past_the_batchnorm(network: nn.Module, batch: torch.Tensor, pairs: list[tuple[str, str]]) -> set[str] | None:
    """The BatchNorms of ``pairs`` whose convolution's output a residual skip also reads or adds to.

    Read from autograd's graph of one forward pass (:func:`forward_graph`): a convolution whose graph
    node two operations read, or whose output tensor was added to in place before the BatchNorm read
    it, cannot take its BatchNorm.

    Args:
        network: the network, in eval mode.
        batch: an input it accepts.
        pairs: ``(conv, batchnorm)`` names.

    Returns:
        the names of those BatchNorms; ``None`` when there is no graph to read.
    """
    nodes: dict[str, Any] = {}

    def record(name: str, tensor: torch.Tensor) -> None:  # returns None: a hook's result replaces the tensor
        nodes.setdefault(name, tensor.grad_fn)

    handles: list = []
    with hooks(handles):
        for conv, bn in pairs:
            handles.append(network.get_submodule(conv).register_forward_hook(lambda m, a, o, n=conv: record(n, o)))
            handles.append(network.get_submodule(bn).register_forward_pre_hook(lambda m, a, n=bn: record(n, a[0])))
        output = forward_graph(network, batch)
    if output is None:
        return None
    readers = graph_readers(output)
    # the BatchNorm must read the convolution's own result (an in-place add in between, as in SegResNetDS's
    # `x += identity`, gives the same tensor another node), and nothing else may read that result
    return {
        bn for conv, bn in pairs
        if nodes.get(conv) is not None and (nodes.get(bn) is not nodes[conv] or readers[nodes[conv]] > 1)
    }


@torch.no_grad()
def fold_batchnorm(
    network: nn.Module, batch: torch.Tensor, rtol: float = 1e-4, probe: NetworkProbe | None = None
) -> list[str]:
    """Fold every BatchNorm that directly follows a convolution into it (in place).

    Each folded BatchNorm becomes ``nn.Identity``. The output on ``batch`` is checked to be
    unchanged; a fold that changes it (the convolution's output also feeds a skip path past the
    BatchNorm) is undone and named in the log (a warning unless a skip explains it), and the other
    folds stay.

    Args:
        network: the network, in eval mode.
        batch: a calibration input.
        rtol: tolerance of the output check, relative to the output's largest magnitude.
        probe: a :func:`probe_network` of ``network`` on ``batch`` (its output and pairs); one is
            run when ``None``.

    Returns:
        names of the folded BatchNorm modules.
    """
    probe = probe or probe_network(network, batch)
    # batch statistics at inference time (no running_var): nothing fixed to fold
    pairs = [(c, b) for c, b in dict.fromkeys(probe.foldable) if network.get_submodule(b).running_var is not None]
    # a pair seen twice (a block called twice) folds as one; a conv or BatchNorm in two different pairs (one
    # BatchNorm after two convs) cannot fold for one call without changing the other
    uses = Counter(name for pair in pairs for name in pair)
    shared = [b for c, b in pairs if uses[c] > 1 or uses[b] > 1]
    pairs = [(c, b) for c, b in pairs if uses[c] == 1 and uses[b] == 1]
    if not pairs and not shared:
        return []
    atol = rtol * float(probe.output.abs().max().clamp_min(1e-12))
    if pairs and _folds_keep_output(network, batch, probe.output, atol, pairs):
        if not shared:
            return [bn for _, bn in pairs]
        folded, differed, skipped, readable = [bn for _, bn in pairs], [], set(), True
    else:
        # one graph pass finds the skips, so the usual case costs three passes instead of a search over every fold
        found = _read_past_the_batchnorm(network, batch, pairs) if pairs else set()
        readable, skipped = found is not None, found or set()
        rest = [p for p in pairs if p[1] not in skipped]
        # with no skip found, the rest is the set that just failed: its own pass would only repeat that
        folded, differed = _fold_checked(network, batch, probe.output, atol, rest, known_to_fail=bool(pairs) and not skipped)
    twice = list(dict.fromkeys(shared))
    refused = [bn for _, bn in pairs if bn in skipped or bn in differed] + twice
    shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
    # a skip's BatchNorm is the architecture (pre-activation blocks), nothing to act on; an output that
    # differs for another reason is
    logger.log(
        logging.WARNING if differed else logging.INFO,
        "%d of %d BatchNorm(s) stay unfolded and run in floating point after their quantized convolutions (%s): %d because "
        "something else reads or adds to the convolution's output first (a residual skip), %d because the convolution "
        "or the BatchNorm also runs with another partner (one BatchNorm after two convolutions), %d because the folded "
        "output differed by more than %.0e of its largest magnitude (float32 at reduced precision, TF32, or an in-place "
        "change autograd does not see)%s. The other %d were folded.",
        len(refused), len(refused) + len(folded), shown, len(skipped), len(twice), len(differed), rtol,
        "" if readable else "; autograd's graph of the network could not be read, so skips were not told apart",
        len(folded),
    )
    return folded
