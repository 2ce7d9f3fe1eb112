/* Minimal avp sender: loan a slot, write a KV cache straight into it, send.
 *
 *   gcc -std=c99 -I include examples/c/sender.c target/release/libavp.a -lpthread -ldl -lm -o sender
 *   ./sender shm://demo
 */
#include <stdio.h>
#include <string.h>

#include "avp.h"

static int fail(const char *what, enum avp_status s) {
  fprintf(stderr, "%s: %s: %s\n", what, avp_status_name(s), avp_last_error_message());
  return 1;
}

int main(int argc, char **argv) {
  const char *addr = argc > 1 ? argv[1] : "shm://demo";
  struct avp_sender tx;
  enum avp_status s = avp_sender_connect(addr, NULL, NULL, &tx);
  if (s != AVP_OK) return fail("connect", s);

  /* SmolLM2-135M's cache shape: 30 layers, 3 KV heads, head_dim 64; 128 positions, f16. */
  struct avp_payload p;
  memset(&p, 0, sizeof p);
  p.kind = AVP_KIND_KV_CACHE;
  p.kv.num_layers = 30;
  p.kv.num_kv_heads = 3;
  p.kv.head_dim = 64;
  p.kv.seq_len = 128;
  p.kv.dtype = AVP_DTYPE_F16;
  p.kv.layout = AVP_LAYOUT_HND;
  if ((s = avp_sender_loan(tx, NULL, &p)) != AVP_OK) return fail("loan", s);
  for (uint32_t layer = 0; layer < p.kv.num_layers; layer++) {
    for (uint32_t part = AVP_KV_K; part <= AVP_KV_V; part++) {
      uint8_t *dst;
      size_t len;
      if ((s = avp_sender_loan_kv_section(tx, layer, part, &dst, &len)) != AVP_OK) return fail("section", s);
      memset(dst, (int)layer, len); /* an engine copies (or computes) its K/V for this layer here */
    }
  }
  if ((s = avp_sender_loan_send(tx)) != AVP_OK) return fail("send", s);
  printf("sent one KV cache to %s\n", addr);
  avp_sender_free(tx);
  return 0;
}
