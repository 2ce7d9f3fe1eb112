/*
 * Two processes exchange KV caches whose sections live in device memory,
 * through the C ABI only, on the emulated device (host memory standing in
 * for a GPU: device addresses are host addresses, so this program plays the
 * kernels that write and read them by dereferencing them, which only the
 * emulation allows). A GPU engine makes the same calls with AVP_DEVICE_CUDA
 * and touches the addresses with its own kernels and copies.
 *
 *   device_exchange recv ADDR   listen at cuda://..., receive COUNT messages,
 *                               check every byte through device addresses and
 *                               both copy directions; print "OK"
 *   device_exchange send ADDR   connect and send them: half of the sections
 *                               written in place, half copied from "device"
 *                               buffers; the last message exceeds a device
 *                               slot (a dedicated allocation)
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "avp.h"
#include "check.h"

#define LAYERS 4
#define HEADS 2
#define HEAD_DIM 64
#define COUNT 4
#define SLOT_BYTES (256u * 1024u)


/* Positions of message n: the last one needs a dedicated device allocation. */
static unsigned seq_of(unsigned n) { return n == COUNT - 1 ? 512 : 16 + 8 * n; }

static unsigned char pattern(unsigned n, unsigned section, size_t j) {
  return (unsigned char)(n * 59u + section * 17u + (unsigned)(j * 7u));
}

static struct avp_payload kv_payload(unsigned seq) {
  struct avp_payload p;
  memset(&p, 0, sizeof p);
  p.kind = AVP_KIND_KV_CACHE;
  p.kv.num_layers = LAYERS;
  p.kv.num_kv_heads = HEADS;
  p.kv.head_dim = HEAD_DIM;
  p.kv.seq_len = seq;
  p.kv.dtype = AVP_DTYPE_F32;
  p.kv.layout = AVP_LAYOUT_HND;
  return p;
}

static struct avp_options device_options(void) {
  struct avp_options o;
  CHECK(avp_options_default(&o));
  o.slots = 2;
  o.token = "device-secret";
  o.device = AVP_DEVICE_EMULATED;
  o.device_slot_size = SLOT_BYTES;
  return o;
}

static int do_recv(const char *addr) {
  struct avp_options o = device_options();
  struct avp_listener l;
  CHECK(avp_listener_bind(addr, NULL, &o, &l));
  printf("ADDR %s\n", addr);
  fflush(stdout);
  struct avp_receiver r;
  CHECK(avp_listener_accept(l, 30000, &r));
  struct avp_session_info si;
  CHECK(avp_receiver_session(r, &si));
  if (si.transport != AVP_TRANSPORT_CUDA) {
    fprintf(stderr, "expected a cuda session: %s\n", si.transport_reason);
    return 1;
  }
  if (!strstr(si.transport_reason, "emulate")) {
    fprintf(stderr, "emulation not reported: %s\n", si.transport_reason);
    return 1;
  }
  for (unsigned n = 0; n < COUNT; n++) {
    struct avp_message m;
    CHECK(avp_receiver_recv(r, 30000, &m));
    struct avp_message_info info;
    CHECK(avp_message_get_info(m, &info));
    if (!info.on_device || info.kv.seq_len != seq_of(n) || info.section_count != 2 * LAYERS) {
      fprintf(stderr, "message %u: on_device %u, seq %llu\n", n, (unsigned)info.on_device,
              (unsigned long long)info.kv.seq_len);
      return 1;
    }
    const uint8_t *p;
    size_t len;
    /* Device sections are not host bytes: a typed refusal, never a crash. */
    EXPECT(avp_message_section(m, 0, &p, &len), AVP_ERR_PLACEMENT);
    EXPECT(avp_message_verify(m), AVP_ERR_PLACEMENT);
    for (unsigned s = 0; s < 2 * LAYERS; s++) {
      uint64_t dev;
      size_t dlen;
      CHECK(avp_message_device_section(m, s, &dev, &dlen));
      /* The "kernel" reads the device address directly (emulated). */
      const unsigned char *d = (const unsigned char *)(uintptr_t)dev;
      unsigned char *host = malloc(dlen);
      unsigned char *mine = malloc(dlen);
      CHECK(avp_message_copy_section_to_host(m, s, host, dlen));
      CHECK(avp_message_copy_section_to_device(m, s, (uint64_t)(uintptr_t)mine));
      for (size_t j = 0; j < dlen; j++) {
        unsigned char want = pattern(n, s, j);
        if (d[j] != want || host[j] != want || mine[j] != want) {
          fprintf(stderr, "message %u section %u byte %zu differs\n", n, s, j);
          return 1;
        }
      }
      EXPECT(avp_message_copy_section_to_host(m, s, host, dlen - 1), AVP_ERR_WIRE);
      free(host);
      free(mine);
    }
    CHECK(avp_message_release(m));
  }
  struct avp_message m;
  EXPECT(avp_receiver_recv(r, 30000, &m), AVP_ERR_PEER_GONE);
  CHECK(avp_receiver_free(r));
  CHECK(avp_listener_free(l));
  if (failures) return 1;
  printf("OK\n");
  return 0;
}

static int do_send(const char *addr) {
  struct avp_options o = device_options();
  struct avp_sender tx;
  CHECK(avp_sender_connect(addr, NULL, &o, &tx));
  struct avp_session_info si;
  CHECK(avp_sender_session(tx, &si));
  if (si.transport != AVP_TRANSPORT_CUDA) {
    fprintf(stderr, "expected a cuda session: %s\n", si.transport_reason);
    return 1;
  }
  /* Discarded device loans give their slots back: with two slots, a third
     discard would wait out the loan timeout if any had leaked. */
  for (int k = 0; k < 3; k++) {
    struct avp_payload p = kv_payload(16);
    CHECK(avp_sender_loan_device(tx, NULL, &p));
    CHECK(avp_sender_loan_discard(tx));
  }
  for (unsigned n = 0; n < COUNT; n++) {
    struct avp_payload p = kv_payload(seq_of(n));
    CHECK(avp_sender_loan_device(tx, NULL, &p));
    uint8_t on = 0;
    CHECK(avp_sender_loan_on_device(tx, &on));
    if (!on) {
      fprintf(stderr, "device loan not on the device\n");
      return 1;
    }
    EXPECT(avp_sender_loan_device(tx, NULL, &p), AVP_ERR_BUSY);
    size_t bytes = (size_t)HEADS * HEAD_DIM * seq_of(n) * 4;
    /* The producer's "device" tensors: they must stay unchanged until the
       send, which is what finishes the loan's copies. */
    unsigned char *srcs[2 * LAYERS] = {0};
    for (unsigned s = 0; s < 2 * LAYERS; s++) {
      if (s % 2 == 0) {
        uint64_t dev;
        size_t len;
        CHECK(avp_sender_loan_device_section(tx, s, &dev, &len));
        if (len != bytes) {
          fprintf(stderr, "section %u is %zu bytes, expected %zu\n", s, len, bytes);
          return 1;
        }
        unsigned char *d = (unsigned char *)(uintptr_t)dev; /* our "kernel" */
        for (size_t j = 0; j < len; j++) d[j] = pattern(n, s, j);
      } else {
        srcs[s] = malloc(bytes);
        for (size_t j = 0; j < bytes; j++) srcs[s][j] = pattern(n, s, j);
        if (s == 1) {
          CHECK(avp_sender_loan_copy_from_host(tx, s, srcs[s], bytes));
        } else {
          CHECK(avp_sender_loan_copy_from_device(tx, s, (uint64_t)(uintptr_t)srcs[s]));
        }
      }
    }
    CHECK(avp_sender_loan_send(tx));
    for (unsigned s = 0; s < 2 * LAYERS; s++) free(srcs[s]);
  }
  EXPECT(avp_sender_loan_discard(tx), AVP_ERR_INVALID_ARGUMENT);
  CHECK(avp_sender_free(tx));
  return failures ? 1 : 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "recv") == 0) return do_recv(argv[2]);
  if (argc == 3 && strcmp(argv[1], "send") == 0) return do_send(argv[2]);
  fprintf(stderr, "usage: %s recv|send ADDR\n", argv[0]);
  return 64;
}
