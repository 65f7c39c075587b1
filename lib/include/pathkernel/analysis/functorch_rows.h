#pragma once
/// Probe rows by functorch's own transforms, driven from C++: what Python's
/// `vmap(jacrev(f))` does over a block of probes, with the C++ layers Debian's LibTorch 1.13
/// ships (ATen/functorch: DynamicLayer, BatchedTensorImpl, TensorWrapper).
///
/// A vmap layer over the probes; inside it a grad layer whose inputs are the parameters, each
/// wrapped for that layer and handed to the model's forward in place of its own
/// (models::Model::forward_with_parameters); the grad layer closed, a second vmap layer over the
/// one-hot vectors of the wanted outputs and one autograd::grad, whose results carry the outputs
/// and the probes as batch dimensions, taken off level by level. functorch's batching rules
/// (not batched_rows.h's) batch every backward operator, over the probes and the outputs at once.

#include <ATen/Tensor.h>

#include <stdexcept>

namespace pathkernel {

namespace models {
class Model;
}

/// Thrown when the model cannot run on swapped parameters, or a functorch transform fails on it
/// (an operator without a batching rule, randomness under vmap); the rows are then unspecified.
struct FunctorchRowsUnsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Writes into `rows` [P*C', n_params] (the parameters' dtype) the gradients of outputs cols[p][j]
/// ([P, C'] int64) of probe x[p] with respect to every parameter, row p*C' + j, flattened in
/// named_parameters() order (zeros where an output does not depend on a parameter): the rows
/// explicit_probe_jacobian forms by one backward each. The probes are taken in blocks of at most
/// `block` at a time (memory: the block's gradients, block x C' x n_params values, besides the
/// rows). Throws FunctorchRowsUnsupported (see above).
void functorch_rows_into(models::Model& model, const at::Tensor& x, const at::Tensor& cols, at::Tensor rows,
                         int64_t block);

}  // namespace pathkernel
