// avp.hpp — a header-only C++17 layer over the avp C ABI (avp.h).
//
// RAII handles (move-only), exceptions for errors, and section views that point
// straight into transport memory: no copies beyond what the C ABI does.
//
//   auto listener = avp::Listener::bind("shm://demo");
//   auto rx = listener.accept(std::chrono::seconds(10));
//   avp::Message m = rx.recv(std::chrono::seconds(10));
//   avp::Bytes k0 = m.kv_section(0, AVP_KV_K);   // points into the sender's slot
//
// A Loan must not outlive its Sender; a Message must not outlive its Receiver.
#ifndef AVP_HPP
#define AVP_HPP

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "avp.h"

namespace avp {

/// An error from the C ABI: its status and message.
class Error : public std::runtime_error {
 public:
  Error(avp_status status, const char* message)
      : std::runtime_error(std::string(avp_status_name(status)) + ": " + message), status_(status) {}
  avp_status status() const noexcept { return status_; }

 private:
  avp_status status_;
};

/// Throw avp::Error unless `s` is AVP_OK.
inline void check(avp_status s) {
  if (s != AVP_OK) throw Error(s, avp_last_error_message());
}

/// A read-only view of bytes in transport or caller memory.
struct Bytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

/// A writable view of loaned memory.
struct MutBytes {
  uint8_t* data = nullptr;
  size_t size = 0;
};

/// A range of device memory: a CUDA device pointer (a host address on the
/// emulated device) and its length.
struct DeviceSpan {
  uint64_t addr = 0;
  size_t size = 0;
};

/// Endpoint options, initialised to the library defaults.
struct Options {
  avp_options raw;
  Options() { check(avp_options_default(&raw)); }
};

inline uint32_t to_ms(std::chrono::milliseconds t) {
  return t.count() < 0 ? 0u : static_cast<uint32_t>(t.count());
}

/// A received (or parsed) message; released on destruction.
class Message {
 public:
  explicit Message(avp_message h) noexcept : h_(h) {}
  Message(Message&& o) noexcept : h_(std::exchange(o.h_, avp_message{0})) {}
  Message& operator=(Message&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, avp_message{0});
    }
    return *this;
  }
  Message(const Message&) = delete;
  Message& operator=(const Message&) = delete;
  ~Message() { reset(); }

  /// Parse a message in caller memory (no copy; the memory must outlive the Message).
  static Message parse(const uint8_t* data, size_t size) {
    avp_message h;
    check(avp_message_parse(data, size, &h));
    return Message(h);
  }

  avp_message_info info() const {
    avp_message_info i;
    check(avp_message_get_info(h_, &i));
    return i;
  }
  Bytes bytes() const { return get(avp_message_bytes, h_); }
  Bytes section(size_t index) const {
    Bytes b;
    check(avp_message_section(h_, index, &b.data, &b.size));
    return b;
  }
  Bytes kv_section(uint32_t layer, avp_kv_part part) const {
    Bytes b;
    check(avp_message_kv_section(h_, layer, static_cast<uint32_t>(part), &b.data, &b.size));
    return b;
  }
  Bytes data() const { return get(avp_message_data, h_); }
  std::string envelope(avp_envelope_field field) const {
    Bytes b;
    check(avp_message_envelope(h_, static_cast<uint32_t>(field), &b.data, &b.size));
    return std::string(reinterpret_cast<const char*>(b.data), b.size);
  }
  void verify() const { check(avp_message_verify(h_)); }
  void verify_layer(uint32_t layer) const { check(avp_message_verify_layer(h_, layer)); }
  /// Whether the sections are in device memory (a cuda:// session).
  bool on_device() const { return info().on_device != 0; }
  /// Section `index` of a device message: valid until the Message is destroyed.
  DeviceSpan device_section(size_t index) const {
    DeviceSpan d;
    check(avp_message_device_section(h_, index, &d.addr, &d.size));
    return d;
  }
  /// Copy section `index` into host memory (exactly its length); finished on return.
  void copy_section_to_host(size_t index, void* dst, size_t size) const {
    check(avp_message_copy_section_to_host(h_, index, static_cast<uint8_t*>(dst), size));
  }
  /// Copy section `index` to device memory of its length; finished on return.
  void copy_section_to_device(size_t index, uint64_t dst) const {
    check(avp_message_copy_section_to_device(h_, index, dst));
  }
  avp_message handle() const noexcept { return h_; }

 private:
  template <class F>
  static Bytes get(F f, avp_message h) {
    Bytes b;
    check(f(h, &b.data, &b.size));
    return b;
  }
  void reset() noexcept {
    if (h_.id) avp_message_release(h_);
    h_.id = 0;
  }
  avp_message h_;
};

/// The receiving half of a session.
class Receiver {
 public:
  explicit Receiver(avp_receiver h) noexcept : h_(h) {}
  Receiver(Receiver&& o) noexcept : h_(std::exchange(o.h_, avp_receiver{0})) {}
  Receiver& operator=(Receiver&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, avp_receiver{0});
    }
    return *this;
  }
  Receiver(const Receiver&) = delete;
  Receiver& operator=(const Receiver&) = delete;
  ~Receiver() { reset(); }

  /// Wait for the next message (throws avp::Error with AVP_ERR_TIMEOUT, AVP_ERR_PEER_GONE, ...).
  Message recv(std::chrono::milliseconds timeout) {
    avp_message m;
    check(avp_receiver_recv(h_, to_ms(timeout), &m));
    return Message(m);
  }
  avp_session_info session() const {
    avp_session_info s;
    check(avp_receiver_session(h_, &s));
    return s;
  }
  /// The shared slot pool (shared-memory sessions only).
  Bytes pool_range() const {
    Bytes b;
    check(avp_receiver_pool_range(h_, &b.data, &b.size));
    return b;
  }

 private:
  void reset() noexcept {
    if (h_.id) avp_receiver_free(h_);
    h_.id = 0;
  }
  avp_receiver h_;
};

/// A listening endpoint.
class Listener {
 public:
  static Listener bind(const std::string& address, const avp_identity* identity = nullptr,
                       const Options* options = nullptr) {
    avp_listener h;
    check(avp_listener_bind(address.c_str(), identity, options ? &options->raw : nullptr, &h));
    return Listener(h);
  }
  Listener(Listener&& o) noexcept : h_(std::exchange(o.h_, avp_listener{0})) {}
  Listener& operator=(Listener&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, avp_listener{0});
    }
    return *this;
  }
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  ~Listener() { reset(); }

  std::string address() const {
    size_t needed = 0;
    avp_listener_address(h_, nullptr, 0, &needed);
    std::string s(needed, '\0');
    check(avp_listener_address(h_, s.data(), s.size(), &needed));
    s.resize(needed - 1);
    return s;
  }
  Receiver accept(std::chrono::milliseconds timeout) {
    avp_receiver r;
    check(avp_listener_accept(h_, to_ms(timeout), &r));
    return Receiver(r);
  }

 private:
  explicit Listener(avp_listener h) noexcept : h_(h) {}
  void reset() noexcept {
    if (h_.id) avp_listener_free(h_);
    h_.id = 0;
  }
  avp_listener h_;
};

/// Loaned transport memory for one message; discarded on destruction unless sent.
class Loan {
 public:
  explicit Loan(avp_sender s) noexcept : s_(s), active_(true) {}
  Loan(Loan&& o) noexcept : s_(o.s_), active_(std::exchange(o.active_, false)) {}
  Loan& operator=(Loan&&) = delete;
  Loan(const Loan&) = delete;
  Loan& operator=(const Loan&) = delete;
  ~Loan() {
    if (active_) avp_sender_loan_discard(s_);
  }

  MutBytes section(size_t index) {
    MutBytes b;
    check(avp_sender_loan_section(s_, index, &b.data, &b.size));
    return b;
  }
  MutBytes kv_section(uint32_t layer, avp_kv_part part) {
    MutBytes b;
    check(avp_sender_loan_kv_section(s_, layer, static_cast<uint32_t>(part), &b.data, &b.size));
    return b;
  }
  /// Checksum, write the header and send.
  void send() {
    active_ = false;
    check(avp_sender_loan_send(s_));
  }

 private:
  avp_sender s_;
  bool active_;
};

/// Loaned memory for a message whose sections come from device memory;
/// discarded on destruction unless sent. Synchronise your own stream before
/// send(): it waits only for the loan's copies.
class DeviceLoan {
 public:
  explicit DeviceLoan(avp_sender s) noexcept : s_(s), active_(true) {}
  DeviceLoan(DeviceLoan&& o) noexcept : s_(o.s_), active_(std::exchange(o.active_, false)) {}
  DeviceLoan& operator=(DeviceLoan&&) = delete;
  DeviceLoan(const DeviceLoan&) = delete;
  DeviceLoan& operator=(const DeviceLoan&) = delete;
  ~DeviceLoan() {
    if (active_) avp_sender_loan_discard(s_);
  }

  /// Whether the sections go to device memory (false: copied to the host).
  bool on_device() const {
    uint8_t on = 0;
    check(avp_sender_loan_on_device(s_, &on));
    return on != 0;
  }
  /// Where section `index` is, for your kernels to write (device sessions).
  DeviceSpan section(size_t index) {
    DeviceSpan d;
    check(avp_sender_loan_device_section(s_, index, &d.addr, &d.size));
    return d;
  }
  /// Copy section `index` from device memory; keep `src` unchanged until send().
  void copy_from_device(size_t index, uint64_t src) {
    check(avp_sender_loan_copy_from_device(s_, index, src));
  }
  /// Copy section `index` from host memory (exactly its length).
  void copy_from_host(size_t index, const void* src, size_t size) {
    check(avp_sender_loan_copy_from_host(s_, index, static_cast<const uint8_t*>(src), size));
  }
  /// Wait for the copies, write the header and send.
  void send() {
    active_ = false;
    check(avp_sender_loan_send(s_));
  }

 private:
  avp_sender s_;
  bool active_;
};

/// The sending half of a session.
class Sender {
 public:
  static Sender connect(const std::string& address, const avp_identity* identity = nullptr,
                        const Options* options = nullptr) {
    avp_sender h;
    check(avp_sender_connect(address.c_str(), identity, options ? &options->raw : nullptr, &h));
    return Sender(h);
  }
  Sender(Sender&& o) noexcept : h_(std::exchange(o.h_, avp_sender{0})) {}
  Sender& operator=(Sender&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, avp_sender{0});
    }
    return *this;
  }
  Sender(const Sender&) = delete;
  Sender& operator=(const Sender&) = delete;
  ~Sender() { reset(); }

  avp_session_info session() const {
    avp_session_info s;
    check(avp_sender_session(h_, &s));
    return s;
  }
  /// Loan memory for one message (waits for a free slot up to the loan timeout).
  Loan loan(const avp_payload& payload, const avp_envelope* envelope = nullptr) {
    check(avp_sender_loan(h_, envelope, &payload));
    return Loan(h_);
  }
  /// Loan memory for a message whose sections come from device memory
  /// (options.device must be set).
  DeviceLoan loan_device(const avp_payload& payload, const avp_envelope* envelope = nullptr) {
    check(avp_sender_loan_device(h_, envelope, &payload));
    return DeviceLoan(h_);
  }
  void send_bytes(const uint8_t* data, size_t size) { check(avp_sender_send_bytes(h_, data, size)); }
  /// Send a one-section payload (hidden states or text) copied from `data`.
  void send_data(const avp_payload& payload, const void* data, size_t size, const avp_envelope* envelope = nullptr) {
    check(avp_sender_send_data(h_, envelope, &payload, static_cast<const uint8_t*>(data), size));
  }

 private:
  explicit Sender(avp_sender h) noexcept : h_(h) {}
  void reset() noexcept {
    if (h_.id) avp_sender_free(h_);
    h_.id = 0;
  }
  avp_sender h_;
};

}  // namespace avp

#endif  // AVP_HPP
