// cuDNN's fused attention (the flash attention of cuDNN 9's graph API, through the header-only
// cuDNN frontend) for mmdit's CUDA backend: O = softmax(Q Kᵀ · scale) V, bf16 or f16, no mask,
// no causality, inference only (no softmax statistics). Called from src/cuda/sdpa.rs.
//
// A graph is built once per (device, dtype, shape, strides, scale) and cached for the process; a
// shape cuDNN cannot run is cached as unsupported, and the caller falls back to its own attention.
// Q, K and V are taken with their strides (b, h, n, d; the last dimension contiguous); O is
// written token-major, (b, n, h, d) contiguous, so that merging the heads afterwards is no copy.
//
// Every entry point returns 0 on success, 1 for "cuDNN does not support this" (prepare only) and
// 2 on an error, whose message is written to `err` (at most err_len bytes, NUL-terminated).

#include <cudnn_frontend.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fe = cudnn_frontend;

namespace {

enum : int64_t { Q_UID = 1, K_UID = 2, V_UID = 3, O_UID = 4 };

struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;  // null where cuDNN cannot run the shape
    int64_t workspace = 0;
};

// device, dtype, b, h, n, m, d, the 12 strides of q, k and v, the scale's bits.
using Key = std::vector<int64_t>;

std::mutex cache_mutex;
std::map<Key, Plan> cache;  // guarded by cache_mutex; plans live as long as the process

// cuDNN handles are per thread and device (as candle keeps its own); never destroyed.
thread_local std::map<int, cudnnHandle_t> handles;

void write_error(char *err, size_t err_len, std::string const &msg) {
    if (err == nullptr || err_len == 0) return;
    size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
}

Key make_key(int device, int dtype, int64_t const *shape, int64_t const *strides, float scale) {
    Key key{device, dtype};
    key.insert(key.end(), shape, shape + 5);
    key.insert(key.end(), strides, strides + 12);
    uint32_t bits = 0;
    std::memcpy(&bits, &scale, sizeof bits);
    key.push_back(bits);
    return key;
}

// The calling thread's handle for `device` (whose context the caller made current).
bool handle_for(int device, cudnnHandle_t *out, char *err, size_t err_len) {
    auto found = handles.find(device);
    if (found != handles.end()) {
        *out = found->second;
        return true;
    }
    cudnnHandle_t h = nullptr;
    cudnnStatus_t status = cudnnCreate(&h);
    if (status != CUDNN_STATUS_SUCCESS) {
        write_error(err, err_len, std::string("cudnnCreate: ") + cudnnGetErrorString(status));
        return false;
    }
    handles.emplace(device, h);
    *out = h;
    return true;
}

// Builds the graph for the key; a null graph where cuDNN reports the shape unsupported.
bool build(cudnnHandle_t handle, Key const &key, Plan *plan, char *err, size_t err_len) {
    int64_t const *shape = key.data() + 2;
    int64_t const *strides = key.data() + 7;
    int64_t const b = shape[0], h = shape[1], n = shape[2], m = shape[3], d = shape[4];
    float scale = 0.0f;
    uint32_t bits = static_cast<uint32_t>(key[19]);
    std::memcpy(&scale, &bits, sizeof scale);

    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(key[1] == 1 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto tensor = [&](char const *name, int64_t uid, int64_t rows, int64_t const *s) {
        return graph->tensor(fe::graph::Tensor_attributes()
                                 .set_name(name)
                                 .set_uid(uid)
                                 .set_dim({b, h, rows, d})
                                 .set_stride({s[0], s[1], s[2], s[3]}));
    };
    auto q = tensor("Q", Q_UID, n, strides);
    auto k = tensor("K", K_UID, m, strides + 4);
    auto v = tensor("V", V_UID, m, strides + 8);
    auto options = fe::graph::SDPA_attributes()
                       .set_name("mmdit_sdpa")
                       .set_generate_stats(false)
                       .set_attn_scale(scale);
    auto outputs = graph->sdpa(q, k, v, options);
    outputs[0]->set_output(true).set_uid(O_UID).set_dim({b, h, n, d}).set_stride({n * h * d, d, h * d, 1});

    // Unsupported shapes and dtypes surface in these steps: the caller falls back.
    if (graph->validate().is_bad() || graph->build_operation_graph(handle).is_bad() ||
        graph->create_execution_plans({fe::HeurMode_t::A}).is_bad() || graph->check_support().is_bad()) {
        plan->graph = nullptr;
        return true;
    }
    auto built = graph->build_plans();
    if (built.is_bad()) {
        plan->graph = nullptr;
        return true;
    }
    int64_t workspace = 0;
    auto sized = graph->get_workspace_size(workspace);
    if (sized.is_bad()) {
        write_error(err, err_len, "cuDNN attention workspace: " + sized.get_message());
        return false;
    }
    plan->graph = graph;
    plan->workspace = workspace;
    return true;
}

}  // namespace

extern "C" {

// Builds (or finds) the plan for these inputs: 0 and the workspace bytes in *workspace, or 1 when
// cuDNN cannot run them. shape: b, h, n (queries), m (keys), d; strides: q's, k's, v's (4 each, in
// elements); dtype: 1 bf16, 2 f16. The device's context must be current on the calling thread.
int mmdit_cudnn_sdpa_prepare(int device, int dtype, int64_t const *shape, int64_t const *strides, float scale,
                             int64_t *workspace, char *err, size_t err_len) {
    try {
        Key key = make_key(device, dtype, shape, strides, scale);
        std::lock_guard<std::mutex> lock(cache_mutex);
        auto found = cache.find(key);
        if (found == cache.end()) {
            cudnnHandle_t handle = nullptr;
            if (!handle_for(device, &handle, err, err_len)) return 2;
            Plan plan;
            if (!build(handle, key, &plan, err, err_len)) return 2;
            found = cache.emplace(key, plan).first;
        }
        if (!found->second.graph) return 1;
        *workspace = found->second.workspace;
        return 0;
    } catch (std::exception const &e) {
        write_error(err, err_len, std::string("cuDNN attention: ") + e.what());
        return 2;
    }
}

// Runs the plan that mmdit_cudnn_sdpa_prepare returned 0 for, on `stream` (a CUstream):
// o (b, n, h, d contiguous) from q, k and v; workspace as large as prepare said (null if 0).
int mmdit_cudnn_sdpa_run(int device, int dtype, int64_t const *shape, int64_t const *strides, float scale,
                         void *stream, void const *q, void const *k, void const *v, void *o, void *workspace,
                         char *err, size_t err_len) {
    try {
        Key key = make_key(device, dtype, shape, strides, scale);
        std::lock_guard<std::mutex> lock(cache_mutex);
        auto found = cache.find(key);
        if (found == cache.end() || !found->second.graph) {
            write_error(err, err_len, "cuDNN attention run without a prepared plan");
            return 2;
        }
        cudnnHandle_t handle = nullptr;
        if (!handle_for(device, &handle, err, err_len)) return 2;
        cudnnStatus_t status = cudnnSetStream(handle, static_cast<cudaStream_t>(stream));
        if (status != CUDNN_STATUS_SUCCESS) {
            write_error(err, err_len, std::string("cudnnSetStream: ") + cudnnGetErrorString(status));
            return 2;
        }
        std::unordered_map<int64_t, void *> pack = {{Q_UID, const_cast<void *>(q)},
                                                    {K_UID, const_cast<void *>(k)},
                                                    {V_UID, const_cast<void *>(v)},
                                                    {O_UID, o}};
        auto ran = found->second.graph->execute(handle, pack, workspace);
        if (ran.is_bad()) {
            write_error(err, err_len, "cuDNN attention: " + ran.get_message());
            return 2;
        }
        return 0;
    } catch (std::exception const &e) {
        write_error(err, err_len, std::string("cuDNN attention: ") + e.what());
        return 2;
    }
}

}  // extern "C"
