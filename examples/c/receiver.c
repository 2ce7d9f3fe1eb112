/* Minimal avp receiver: accept one sender, print each KV message's shape, verify it.
 *
 *   cargo build --release -p avp-ffi
 *   gcc -std=c99 -I include examples/c/receiver.c target/release/libavp.a -lpthread -ldl -lm -o receiver
 *   ./receiver shm://demo
 */
#include <stdio.h>

#include "avp.h"

static int fail(const char *what, enum avp_status s) {
  fprintf(stderr, "%s: %s: %s\n", what, avp_status_name(s), avp_last_error_message());
  return 1;
}

int main(int argc, char **argv) {
  const char *addr = argc > 1 ? argv[1] : "shm://demo";
  struct avp_listener listener;
  enum avp_status s = avp_listener_bind(addr, NULL, NULL, &listener);
  if (s != AVP_OK) return fail("bind", s);
  printf("listening on %s\n", addr);
  fflush(stdout);

  struct avp_receiver rx;
  if ((s = avp_listener_accept(listener, 60000, &rx)) != AVP_OK) return fail("accept", s);
  struct avp_session_info info;
  avp_receiver_session(rx, &info);
  printf("session %s over %s: %s\n", info.session_id, info.transport == AVP_TRANSPORT_SHM ? "shm" : "tcp",
         info.transport_reason);

  for (;;) {
    struct avp_message m;
    s = avp_receiver_recv(rx, 60000, &m);
    if (s == AVP_ERR_PEER_GONE) break;
    if (s != AVP_OK) return fail("recv", s);
    struct avp_message_info mi;
    avp_message_get_info(m, &mi);
    if (mi.kind == AVP_KIND_KV_CACHE) {
      const uint8_t *k0;
      size_t len;
      avp_message_kv_section(m, 0, AVP_KV_K, &k0, &len); /* points into the sender's memory */
      printf("KV cache: %u layers x %u heads x %u dims x %llu positions; K[0] is %zu bytes\n",
             mi.kv.num_layers, mi.kv.num_kv_heads, mi.kv.head_dim, (unsigned long long)mi.kv.seq_len, len);
    }
    if ((s = avp_message_verify(m)) != AVP_OK) return fail("verify", s);
    avp_message_release(m); /* returns the slot to the sender */
  }
  avp_receiver_free(rx);
  avp_listener_free(listener);
  return 0;
}
