// bitnet_stream_tokens: stream int32 [1 + B] (the stream id, then a step's B tokens) -> nothing.
//
// `generate` streams the tokens of its decode loop to an `on_tokens` callback. Through
// jax's io_callback that cost 0.6-0.8 ms a step on a 2B4T-shaped model (a Zen 4, 2 threads):
// jax wraps the operands as arrays and runs Python on XLA's thread, after the step's weights
// have flushed the interpreter out of the caches. Here the step only appends its tokens to the
// stream's queue and wakes the consumer, a Python thread blocked in PopTokens with the GIL
// released, which calls `on_tokens` while the program goes on (bitnet_jax/serve/generate.py).
//
// A push to a stream that was cancelled (its consumer raised) or never opened is an error, so
// the program stops at its next step instead of decoding tokens nobody reads.

#include "token_stream.h"

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "ffi_util.h"

namespace ffi = xla::ffi;

namespace bitnet {
namespace {

struct Stream {
  std::deque<std::vector<int32_t>> queue;
  bool finished = false;
  bool cancelled = false;
  std::string reason;
  std::condition_variable ready;
};

// Every stream, under one lock: a push or pop holds it for a few microseconds, once a step.
struct Registry {
  std::mutex mutex;
  std::map<int64_t, std::shared_ptr<Stream>> streams;
};

Registry& Streams() {
  static Registry* registry = new Registry();  // never destroyed: handlers may run at exit
  return *registry;
}

std::shared_ptr<Stream> Find(Registry& r, int64_t id) {
  auto it = r.streams.find(id);
  return it == r.streams.end() ? nullptr : it->second;
}

}  // namespace

void OpenTokenStream(int64_t id) {
  Registry& r = Streams();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.streams[id] = std::make_shared<Stream>();
}

bool PopTokens(int64_t id, std::vector<int32_t>* tokens) {
  Registry& r = Streams();
  std::unique_lock<std::mutex> lock(r.mutex);
  std::shared_ptr<Stream> s = Find(r, id);
  if (s == nullptr) return false;
  s->ready.wait(lock, [&] { return !s->queue.empty() || s->finished; });
  if (s->queue.empty()) return false;
  *tokens = std::move(s->queue.front());
  s->queue.pop_front();
  return true;
}

void FinishTokenStream(int64_t id) {
  Registry& r = Streams();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (std::shared_ptr<Stream> s = Find(r, id)) {
    s->finished = true;
    s->ready.notify_all();
  }
}

void CancelTokenStream(int64_t id, const std::string& reason) {
  Registry& r = Streams();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (std::shared_ptr<Stream> s = Find(r, id)) {
    s->cancelled = true;
    s->reason = reason;
  }
}

void CloseTokenStream(int64_t id) {
  Registry& r = Streams();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (std::shared_ptr<Stream> s = Find(r, id)) {
    s->finished = true;
    s->ready.notify_all();  // a consumer still waiting returns false
    r.streams.erase(id);
  }
}

}  // namespace bitnet

namespace {

ffi::Error StreamTokensImpl(ffi::Buffer<ffi::S32> stream_and_tokens) {
  const std::string op = "bitnet_stream_tokens: ";
  const auto dims = stream_and_tokens.dimensions();
  if (dims.size() != 1 || dims[0] < 1) {
    return ffi::Error::InvalidArgument(op + "expected int32 [1 + B] (the stream id, then the tokens), got shape " +
                                       bitnet::ShapeString(dims));
  }
  const int32_t* data = stream_and_tokens.typed_data();
  const int64_t id = data[0];
  bitnet::Registry& r = bitnet::Streams();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::shared_ptr<bitnet::Stream> s = bitnet::Find(r, id);
  if (s == nullptr) return ffi::Error::InvalidArgument(op + "no open stream " + std::to_string(id));
  if (s->cancelled) return ffi::Error(ffi::ErrorCode::kCancelled, op + "the stream's consumer stopped: " + s->reason);
  s->queue.emplace_back(data + 1, data + dims[0]);
  s->ready.notify_one();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetStreamTokens, StreamTokensImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S32>>());  // [stream id, tokens...]
