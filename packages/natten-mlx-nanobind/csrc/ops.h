// The MLX side: one Primitive class for the six ops, and the functions that build them.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace na {

namespace mx = mlx::core;

enum class OpKind { FusedFwd, FusedBwd, QkFwd, QkBwd, AvFwd, AvBwd };

struct Config {
  int nd;  // spatial axes (1, 2, 3)
  int K[3], S[3], Dl[3];
  bool C[3];
  float scale;
  bool extra, rpb;
  // sub-domain (sharded) problems: global axis lengths and the offsets of local query/key 0
  bool sub;
  int dom[3], qoff[3], koff[3];
  bool operator==(const Config& o) const;
};

class NAOp : public mx::Primitive {
 public:
  NAOp(mx::Stream s, OpKind kind, Config cfg) : mx::Primitive(s), kind_(kind), cfg_(cfg) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override;
  const char* name() const override;
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  OpKind kind_;
  Config cfg_;
};

using Opt = std::optional<mx::array>;

// Every function validates its arguments (std::invalid_argument, i.e. ValueError in Python) and
// returns lazy arrays; scale <= 0 is allowed (it is any real number), NaN is not.
std::vector<mx::array> op_fused_forward(const mx::array& q, const mx::array& k, const mx::array& v, const Opt& ek,
                                     const Opt& ev, const Opt& rpb, const std::vector<int>& kernel_size,
                                     const std::vector<int>& stride, const std::vector<int>& dilation,
                                     const std::vector<bool>& is_causal, std::optional<double> scale,
                                     const std::optional<std::vector<int>>& domain,
                                     const std::optional<std::vector<int>>& query_offset,
                                     const std::optional<std::vector<int>>& kv_offset, mx::StreamOrDevice s);
mx::array op_qk_forward(const mx::array& q, const mx::array& k, const Opt& ek, const Opt& rpb,
                     const std::vector<int>& kernel_size, const std::vector<int>& stride,
                     const std::vector<int>& dilation, const std::vector<bool>& is_causal,
                     std::optional<double> scale, mx::StreamOrDevice s);
mx::array op_av_forward(const mx::array& attn, const mx::array& v, const Opt& ev, const std::vector<int>& kernel_size,
                     const std::vector<int>& stride, const std::vector<int>& dilation,
                     const std::vector<bool>& is_causal, mx::StreamOrDevice s);

// Output buffers kept for reuse (CPU-only MLX builds; NATTEN_MLX_POOL_MB): bytes kept now, and freeing them.
size_t pool_bytes();
void pool_clear();
void pool_poison();
// XINUSE's AVX bit (ymm upper halves in use) on the stream thread before and after the vzeroupper that ends
// the last op's task (-1: the CPU cannot say; not x86-64)
std::pair<int, int> upper_state();

}  // namespace na
