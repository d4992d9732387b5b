"""The torch.compile backend of ``speed.compile=cudagraphs``: torch's own, with the weights
read where they are.

cudagraph trees copy each input of a recorded graph into the graph's memory pool before
every replay, unless told the input is *static* (it keeps its address from call to call,
and the graph reads it in place). torch's ``cudagraphs`` backend
(``torch._dynamo.backends.cudagraphs``) names as static the parameters AOT autograd lifts
into the graph, and since dynamo inlines nn modules (always, from torch 2.6) it lifts
none: every weight of the UNet reaches the graph as an ordinary input, and so is copied at
every replay. Counted on the CPU (2026-11-27, ``python benchmarks/cudagraphs_cpu_check.py
trainer pocket-rlcm-incompressibility`` with the backend's checks printed): AOT autograd
records 437 of the pocket UNet's 441 graph inputs as static, torch's backend passes 0.
Measured on an H100 before this was known (2026-11-26, ``benchmarks/unet_profile.py
--variants eager,...,cudagraphs``, SD 1.5): the graphed sampling call ran 1,046 more
kernels than eager's (3,675 against 2,629) and 4.45 ms of kernels of the "other" kind,
the training call 1,390 more and 9.3 ms, and the sampling call's wall time exceeded its
kernels' by 16 ms (the host walking ~1,000 inputs to copy them): the graphed sampling call
took 91.5 ms against eager's 79.2. The pool must also hold that copy of the weights
(SD 1.5's 1.7 GB; SDXL's 5.1).

Inductor's graph modes (``reduce-overhead``) tell cudagraph trees the static inputs AOT
autograd records (``fw_metadata.static_input_indices``: parameters and buffers). This
backend does the same and is otherwise torch's, line for line. A weight whose storage
moves (``param.data = ...``) is then recorded again (cudagraph trees compare the
addresses at each call), never read stale; the trainer moves none of the UNet's once it
is compiled (the optimiser and NFT's sampling weights update in place). Where torch's
internals differ from those this was written against (torch 2.11-2.13), torch's own
backend runs instead (``cudagraphs_compiler``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

STOCK = "cudagraphs"
"""torch's own backend, by its registered name."""


def cudagraphs_compiler() -> Callable[..., Any] | str:
    """What ``torch.compile`` takes for ``speed.compile=cudagraphs``: this module's backend,
    or torch's own (by name) where the pieces it needs are missing."""
    try:
        from torch._dynamo.backends import cudagraphs as stock
        from torch._inductor.compile_fx import get_static_input_idxs
        from torch._inductor.cudagraph_trees import cudagraphify_impl

        needed = (
            "aot_autograd",
            "boxed_nop",
            "check_for_skip",
            "count_tangents",
            "find_input_mutations",
            "get_device_index",
            "get_placeholder_info",
            "get_stack_traces",
            "log_cudagraph_skip_and_bump_counter",
            "num_fw_fixed_arguments",
            "BoxedBool",
            "BoxedDeviceIndex",
        )
        if not all(hasattr(stock, name) for name in needed):
            return STOCK
        del get_static_input_idxs, cudagraphify_impl  # importable: enough
    except ImportError:
        return STOCK
    return cudagraphs_reading_weights_in_place


def cudagraphs_reading_weights_in_place(
    dynamo_model: torch.fx.GraphModule, dynamo_inputs: Sequence[Any]
) -> Any:
    """torch's ``cudagraphs`` backend, whose forward graphs read the static inputs AOT
    autograd records (the weights) in place instead of copying them at each replay."""
    from torch._dynamo.backends import cudagraphs as stock
    from torch._inductor.compile_fx import get_static_input_idxs
    from torch._inductor.cudagraph_trees import cudagraphify_impl

    do_cudagraphs = stock.BoxedBool(True)
    device_index = stock.BoxedDeviceIndex(None)

    def record(
        aot_model: torch.fx.GraphModule,
        aot_inputs: list[Any],
        static: Sequence[int],
        is_backward: bool,
        is_inference: bool,
    ) -> Any:
        """The graph handed to cudagraph trees, ``static`` its inputs read in place."""
        out = cudagraphify_impl(
            stock.boxed_nop(aot_model, aot_inputs),
            aot_inputs,
            static,
            device_index=stock.get_device_index(aot_model),
            is_backward=is_backward,
            is_inference=is_inference,
            stack_traces=stock.get_stack_traces(aot_model),
            placeholders=stock.get_placeholder_info(aot_model.graph),
            mutated_input_idxs=stock.find_input_mutations(aot_model.graph),
        )
        out._boxed_call = True
        return out

    def forward(
        aot_model: torch.fx.GraphModule, aot_inputs: list[Any], is_inference: bool = False
    ) -> Any:
        fixed = stock.num_fw_fixed_arguments(len(dynamo_inputs), len(aot_inputs))
        if skip := stock.check_for_skip(aot_model, fixed):
            stock.BoxedBool.disable(do_cudagraphs)
            stock.log_cudagraph_skip_and_bump_counter(f"skipping cudagraphs due to {skip}")
            return stock.boxed_nop(aot_model, aot_inputs)
        device_index.set(stock.get_device_index(aot_model))
        # torch's backend: range(fixed), no weight among them
        static = get_static_input_idxs(fixed)
        return record(aot_model, aot_inputs, static, is_backward=False, is_inference=is_inference)

    def backward(aot_model: torch.fx.GraphModule, aot_inputs: list[Any]) -> Any:
        """torch's: the saved tensors (weights among them) are static already."""
        if not do_cudagraphs:
            return aot_model
        fixed = stock.count_tangents(aot_model)
        if skip := stock.check_for_skip(aot_model, fixed):
            stock.log_cudagraph_skip_and_bump_counter(f"skipping cudagraphs due to {skip}")
            manager = torch._inductor.cudagraph_trees.get_manager(
                device_index.value or 0, create_if_none_exists=False
            )
            if manager is None:
                raise AssertionError("cudagraph manager must exist for backward")

            def run_backward(inputs: list[Any]) -> Any:
                manager.set_to_running_backward()
                return aot_model(inputs)

            run_backward._boxed_call = True  # type: ignore[attr-defined]
            return run_backward
        return record(aot_model, aot_inputs, range(fixed), is_backward=True, is_inference=False)

    compiler = stock.aot_autograd(
        fw_compiler=forward,
        bw_compiler=backward,
        inference_compiler=functools.partial(forward, is_inference=True),
        keep_inference_input_mutations=torch._dynamo.config.cudagraph_backend_keep_input_mutation,
    )
    return compiler(dynamo_model, dynamo_inputs)
