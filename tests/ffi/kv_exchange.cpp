// The C++ RAII layer (avp.hpp) moving a multi-layer KV cache between two processes.
//
//   kv_exchange_cpp recv ADDR [tcp]   /   kv_exchange_cpp send ADDR [tcp]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "avp.hpp"

namespace {

constexpr uint32_t kLayers = 4, kHeads = 3, kHeadDim = 32, kSeq = 50, kCount = 4;
constexpr std::chrono::seconds kTimeout{30};

uint8_t pattern(uint32_t n, uint32_t layer, uint32_t part, size_t j) {
  return static_cast<uint8_t>(n * 57u + layer * 29u + part * 3u + j * 11u);
}

avp_payload kv() {
  avp_payload p{};
  p.kind = AVP_KIND_KV_CACHE;
  p.kv.num_layers = kLayers;
  p.kv.num_kv_heads = kHeads;
  p.kv.head_dim = kHeadDim;
  p.kv.seq_len = kSeq;
  p.kv.dtype = AVP_DTYPE_BF16;
  p.kv.layout = AVP_LAYOUT_NHD;
  return p;
}

int recv(const std::string& addr, bool tcp) {
  avp::Options o;
  o.raw.allow_shm_upgrade = tcp ? 0 : 1;
  auto listener = avp::Listener::bind(addr, nullptr, &o);
  std::cout << "ADDR " << listener.address() << std::endl;
  avp::Receiver rx = listener.accept(kTimeout);
  avp_session_info s = rx.session();
  if ((s.transport == AVP_TRANSPORT_TCP) != tcp) throw std::runtime_error("unexpected transport");
  avp::Bytes pool{};
  if (!tcp) pool = rx.pool_range();
  for (uint32_t n = 0; n < kCount; n++) {
    avp::Message m = rx.recv(kTimeout);
    avp_message_info info = m.info();
    if (info.kv.num_layers != kLayers || info.kv.layout != AVP_LAYOUT_NHD) throw std::runtime_error("shape");
    for (uint32_t layer = 0; layer < kLayers; layer++) {
      for (uint32_t part = 0; part < 2; part++) {
        avp::Bytes b = m.kv_section(layer, static_cast<avp_kv_part>(part));
        if (!tcp && (b.data < pool.data || b.data + b.size > pool.data + pool.size))
          throw std::runtime_error("section outside the shared pool");
        for (size_t j = 0; j < b.size; j++)
          if (b.data[j] != pattern(n, layer, part, j)) throw std::runtime_error("byte differs");
      }
    }
    m.verify();
    if (m.envelope(AVP_FIELD_SOURCE_AGENT_ID) != "cpp-engine") throw std::runtime_error("envelope");
  }
  try {
    rx.recv(std::chrono::seconds(10));
    throw std::runtime_error("expected the sender to leave");
  } catch (const avp::Error& e) {
    if (e.status() != AVP_ERR_PEER_GONE) throw;
  }
  std::cout << "OK" << std::endl;
  return 0;
}

int send(const std::string& addr, bool tcp) {
  avp::Options o;
  o.raw.allow_shm_upgrade = tcp ? 0 : 1;
  avp::Sender tx = avp::Sender::connect(addr, nullptr, &o);
  avp_envelope env{};
  env.source_agent_id = "cpp-engine";
  for (uint32_t n = 0; n < kCount; n++) {
    avp::Loan loan = tx.loan(kv(), &env);
    for (uint32_t layer = 0; layer < kLayers; layer++) {
      for (uint32_t part = 0; part < 2; part++) {
        avp::MutBytes b = loan.kv_section(layer, static_cast<avp_kv_part>(part));
        for (size_t j = 0; j < b.size; j++) b.data[j] = pattern(n, layer, part, j);
      }
    }
    loan.send();
  }
  {
    avp::Loan unused = tx.loan(kv(), &env);  // dropped: discarded, slot returned
  }
  std::cout << "SENT" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 64;
  bool tcp = argc >= 4 && std::strcmp(argv[3], "tcp") == 0;
  try {
    return std::strcmp(argv[1], "recv") == 0 ? recv(argv[2], tcp) : send(argv[2], tcp);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
