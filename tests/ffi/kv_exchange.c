/*
 * Two processes exchange a multi-layer KV cache through the C ABI only.
 *
 *   kv_exchange recv ADDR [MODE]  listen, receive COUNT KV messages plus a hidden-state
 *                                 and a text message, verify every byte; print "OK"
 *   kv_exchange send ADDR [MODE]  connect and send them
 *   kv_exchange badargs           every function with bad arguments
 *
 * MODE "tcp": the session stays on TCP; "http": http:// (the Python reference's
 * binding); "rdma": rdma:// on the emulated device. Otherwise shared memory is
 * used and every received section pointer must lie inside the shared pool
 * (zero copy).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "avp.h"
#include "check.h"

#define LAYERS 6
#define HEADS 2
#define HEAD_DIM 64
#define SEQ 37
#define COUNT 5


static unsigned char pattern(unsigned n, unsigned layer, unsigned part, size_t j) {
  return (unsigned char)(n * 101u + layer * 31u + part * 7u + (unsigned)(j * 13u));
}

static struct avp_payload kv_payload(void) {
  struct avp_payload p;
  memset(&p, 0, sizeof p);
  p.kind = AVP_KIND_KV_CACHE;
  p.kv.num_layers = LAYERS;
  p.kv.num_kv_heads = HEADS;
  p.kv.head_dim = HEAD_DIM;
  p.kv.seq_len = SEQ;
  p.kv.dtype = AVP_DTYPE_F16;
  p.kv.layout = AVP_LAYOUT_HND;
  return p;
}

static struct avp_identity identity(void) {
  struct avp_identity id;
  memset(&id, 0, sizeof id);
  id.model_family = "llama";
  id.model_id = "HuggingFaceTB/SmolLM2-135M-Instruct";
  id.hidden_dim = 576;
  id.num_layers = 30;
  id.num_kv_heads = 3;
  id.head_dim = 64;
  return id;
}

static const char TEXT[] = "{\"role\":\"researcher\",\"content\":\"x = 6 * 7\"}";

/* "emulated" when the programs run over rdma:// (the software RDMA device). */
static const char *RDMA_DEVICE = NULL;
/* Set when the programs run over http:// (the Python reference's binding). */
static int HTTP = 0;

static int do_recv(const char *addr, int tcp) {
  struct avp_identity id = identity();
  struct avp_options o;
  CHECK(avp_options_default(&o));
  o.allow_shm_upgrade = tcp ? 0 : 1;
  o.token = "c-secret";
  o.rdma_device = RDMA_DEVICE;
  struct avp_listener l;
  CHECK(avp_listener_bind(addr, &id, &o, &l));
  char where[256];
  size_t needed = 0;
  CHECK(avp_listener_address(l, where, sizeof where, &needed));
  printf("ADDR %s\n", where);
  fflush(stdout);

  struct avp_receiver r;
  CHECK(avp_listener_accept(l, 30000, &r));
  struct avp_session_info si;
  CHECK(avp_receiver_session(r, &si));
  int want = HTTP ? AVP_TRANSPORT_HTTP
             : tcp  ? AVP_TRANSPORT_TCP
             : RDMA_DEVICE ? AVP_TRANSPORT_RDMA
                           : AVP_TRANSPORT_SHM;
  printf("SESSION %s mode=%d transport=%d (%s)\n", si.session_id, (int)si.mode,
         (int)si.transport, si.transport_reason);
  if ((int)si.transport != want) {
    fprintf(stderr, "unexpected transport\n");
    return 1;
  }
  const uint8_t *pool = NULL;
  size_t pool_len = 0;
  if (!tcp) CHECK(avp_receiver_pool_range(r, &pool, &pool_len));

  for (unsigned n = 0; n < COUNT; n++) {
    struct avp_message m;
    CHECK(avp_receiver_recv(r, 30000, &m));
    struct avp_message_info info;
    CHECK(avp_message_get_info(m, &info));
    if (info.kind != AVP_KIND_KV_CACHE || info.kv.num_layers != LAYERS || info.kv.seq_len != SEQ ||
        info.kv.dtype != AVP_DTYPE_F16 || info.section_count != 2 * LAYERS) {
      fprintf(stderr, "message %u: unexpected shape\n", n);
      return 1;
    }
    for (unsigned layer = 0; layer < LAYERS; layer++) {
      for (unsigned part = 0; part < 2; part++) {
        const uint8_t *p;
        size_t len;
        CHECK(avp_message_kv_section(m, layer, part, &p, &len));
        if (len != (size_t)HEADS * SEQ * HEAD_DIM * 2) {
          fprintf(stderr, "bad section length %zu\n", len);
          return 1;
        }
        if (!tcp && (p < pool || p + len > pool + pool_len)) {
          fprintf(stderr, "section outside the shared pool: not zero copy\n");
          return 1;
        }
        for (size_t j = 0; j < len; j++) {
          if (p[j] != pattern(n, layer, part, j)) {
            fprintf(stderr, "message %u layer %u part %u byte %zu differs\n", n, layer, part, j);
            return 1;
          }
        }
      }
      CHECK(avp_message_verify_layer(m, layer));
    }
    const uint8_t *model;
    size_t model_len;
    CHECK(avp_message_envelope(m, AVP_FIELD_MODEL_ID, &model, &model_len));
    if (model_len != strlen("smollm2") || memcmp(model, "smollm2", model_len) != 0) {
      fprintf(stderr, "bad model id\n");
      return 1;
    }
    CHECK(avp_message_verify(m));
    CHECK(avp_message_release(m));
  }

  /* A hidden state (f32, 2 x 8) and a JSON text message. */
  struct avp_message h;
  CHECK(avp_receiver_recv(r, 30000, &h));
  struct avp_message_info hi;
  CHECK(avp_message_get_info(h, &hi));
  const uint8_t *data;
  size_t data_len;
  CHECK(avp_message_data(h, &data, &data_len));
  float row[16];
  memcpy(row, data, sizeof row);
  const uint8_t *map;
  size_t map_len;
  CHECK(avp_message_envelope(h, AVP_FIELD_MAP_ID, &map, &map_len));
  if (hi.kind != AVP_KIND_HIDDEN_STATE || hi.hidden_rows != 2 || hi.hidden_dim != 8 || data_len != 64 ||
      row[15] != 15.0f || map_len != 5 || memcmp(map, "vocab", 5) != 0) {
    fprintf(stderr, "bad hidden-state message\n");
    return 1;
  }
  CHECK(avp_message_release(h));
  struct avp_message t;
  CHECK(avp_receiver_recv(r, 30000, &t));
  CHECK(avp_message_data(t, &data, &data_len));
  if (data_len != strlen(TEXT) || memcmp(data, TEXT, data_len) != 0) {
    fprintf(stderr, "bad text message\n");
    return 1;
  }
  /* Freeing a receiver that still holds a message is refused. */
  EXPECT(avp_receiver_free(r), AVP_ERR_BUSY);
  CHECK(avp_message_release(t));

  /* The sender leaves: the next receive says so. */
  struct avp_message none;
  EXPECT(avp_receiver_recv(r, 10000, &none), AVP_ERR_PEER_GONE);
  CHECK(avp_receiver_free(r));
  CHECK(avp_listener_free(l));
  if (failures) return 1;
  printf("OK\n");
  return 0;
}

static int do_send(const char *addr, int tcp) {
  struct avp_identity id = identity();
  struct avp_options o;
  CHECK(avp_options_default(&o));
  o.allow_shm_upgrade = tcp ? 0 : 1;
  o.token = "c-secret";
  o.rdma_device = RDMA_DEVICE;
  o.slots = 2;
  struct avp_sender s;
  CHECK(avp_sender_connect(addr, &id, &o, &s));
  struct avp_session_info si;
  CHECK(avp_sender_session(s, &si));
  if (si.mode != AVP_MODE_LATENT) {
    fprintf(stderr, "same model should negotiate latent mode, got %d\n", (int)si.mode);
    return 1;
  }
  struct avp_envelope env;
  memset(&env, 0, sizeof env);
  env.model_id = "smollm2";
  env.session_id = si.session_id;
  struct avp_payload p = kv_payload();
  for (unsigned n = 0; n < COUNT; n++) {
    CHECK(avp_sender_loan(s, &env, &p));
    for (unsigned layer = 0; layer < LAYERS; layer++) {
      for (unsigned part = 0; part < 2; part++) {
        uint8_t *dst;
        size_t len;
        CHECK(avp_sender_loan_kv_section(s, layer, part, &dst, &len));
        for (size_t j = 0; j < len; j++) dst[j] = pattern(n, layer, part, j); /* the engine writes its KV here */
      }
    }
    CHECK(avp_sender_loan_send(s));
  }
  float hidden[16];
  for (int i = 0; i < 16; i++) hidden[i] = (float)i;
  struct avp_payload hp;
  memset(&hp, 0, sizeof hp);
  hp.kind = AVP_KIND_HIDDEN_STATE;
  hp.hidden.rows = 2;
  hp.hidden.dim = 8;
  hp.hidden.dtype = AVP_DTYPE_F32;
  hp.hidden.map_id = "vocab";
  CHECK(avp_sender_send_data(s, &env, &hp, (const uint8_t *)hidden, sizeof hidden));
  struct avp_payload tp;
  memset(&tp, 0, sizeof tp);
  tp.kind = AVP_KIND_TEXT;
  tp.text_format = AVP_TEXT_JSON;
  tp.text_len = strlen(TEXT);
  CHECK(avp_sender_send_data(s, &env, &tp, (const uint8_t *)TEXT, strlen(TEXT)));
  CHECK(avp_sender_free(s));
  printf("SENT\n");
  return 0;
}

/* Every function with NULL pointers, dead or foreign handles, bad enum values and wrong sizes. */
static int do_badargs(void) {
  struct avp_listener l0 = {0};
  struct avp_receiver r0 = {0};
  struct avp_sender s0 = {0};
  struct avp_message m0 = {0};
  struct avp_writer w0 = {0};
  struct avp_message m;
  struct avp_receiver r;
  struct avp_sender s;
  struct avp_listener l;
  struct avp_writer w;
  struct avp_session_info si;
  struct avp_message_info mi;
  const uint8_t *cp;
  uint8_t *p;
  size_t n;
  char buf[8];

  if (strlen(avp_version()) == 0 || avp_abi_version() != 3) failures++;
  EXPECT(avp_options_default(NULL), AVP_ERR_NULL);
  struct avp_options o;
  CHECK(avp_options_default(&o));

  EXPECT(avp_listener_bind(NULL, NULL, NULL, &l), AVP_ERR_NULL);
  EXPECT(avp_listener_bind("shm://x", NULL, NULL, NULL), AVP_ERR_NULL);
  EXPECT(avp_listener_bind("udp://nowhere", NULL, NULL, &l), AVP_ERR_INVALID_ARGUMENT);
  o.slots = 0;
  EXPECT(avp_listener_bind("shm://x", NULL, &o, &l), AVP_ERR_INVALID_ARGUMENT);
  CHECK(avp_options_default(&o));
  EXPECT(avp_listener_address(l0, buf, sizeof buf, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_listener_accept(l0, 1, &r), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_listener_accept(l0, 1, NULL), AVP_ERR_NULL);
  EXPECT(avp_listener_free(l0), AVP_ERR_INVALID_HANDLE);

  /* A live listener: small buffers, timeouts, wrong-kind handles, double free. */
  char name[64];
  snprintf(name, sizeof name, "shm://avp-c-badargs-%ld", (long)getpid());
  CHECK(avp_listener_bind(name, NULL, NULL, &l));
  EXPECT(avp_listener_address(l, buf, 4, &n), AVP_ERR_BUFFER_TOO_SMALL);
  if (n != strlen(name) + 1) failures++;
  EXPECT(avp_listener_address(l, NULL, 0, &n), AVP_ERR_NULL);
  EXPECT(avp_listener_accept(l, 10, &r), AVP_ERR_TIMEOUT);
  struct avp_receiver forged = {l.id};
  EXPECT(avp_receiver_free(forged), AVP_ERR_INVALID_HANDLE);
  struct avp_listener forged_gen = {l.id ^ (1ull << 30)};
  EXPECT(avp_listener_free(forged_gen), AVP_ERR_INVALID_HANDLE);
  CHECK(avp_listener_free(l));
  EXPECT(avp_listener_free(l), AVP_ERR_INVALID_HANDLE);

  EXPECT(avp_receiver_session(r0, &si), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_receiver_pool_range(r0, &cp, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_receiver_pool_range(r0, NULL, &n), AVP_ERR_NULL);
  EXPECT(avp_receiver_recv(r0, 1, &m), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_receiver_recv(r0, 1, NULL), AVP_ERR_NULL);
  EXPECT(avp_receiver_free(r0), AVP_ERR_INVALID_HANDLE);

  EXPECT(avp_sender_connect(NULL, NULL, NULL, &s), AVP_ERR_NULL);
  EXPECT(avp_sender_connect("shm://avp-c-nobody-listens", NULL, NULL, &s), AVP_ERR_IO);
  EXPECT(avp_sender_connect("shm://x", NULL, NULL, NULL), AVP_ERR_NULL);
  EXPECT(avp_sender_session(s0, &si), AVP_ERR_INVALID_HANDLE);
  struct avp_payload kv = kv_payload();
  EXPECT(avp_sender_loan(s0, NULL, &kv), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_sender_loan(s0, NULL, NULL), AVP_ERR_NULL);
  EXPECT(avp_sender_loan_section(s0, 0, &p, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_sender_loan_section(s0, 0, NULL, &n), AVP_ERR_NULL);
  EXPECT(avp_sender_loan_kv_section(s0, 0, AVP_KV_K, &p, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_sender_loan_send(s0), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_sender_loan_discard(s0), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_sender_send_bytes(s0, (const uint8_t *)"x", 1), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_sender_send_bytes(s0, NULL, 1), AVP_ERR_NULL);
  EXPECT(avp_sender_send_data(s0, NULL, &kv, (const uint8_t *)"x", 1), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_sender_send_data(s0, NULL, NULL, (const uint8_t *)"x", 1), AVP_ERR_NULL);
  EXPECT(avp_sender_free(s0), AVP_ERR_INVALID_HANDLE);

  EXPECT(avp_message_parse(NULL, 0, &m), AVP_ERR_NULL);
  EXPECT(avp_message_parse((const uint8_t *)"AV", 2, NULL), AVP_ERR_NULL);
  EXPECT(avp_message_parse((const uint8_t *)"garbage!", 8, &m), AVP_ERR_WIRE);
  EXPECT(avp_message_get_info(m0, &mi), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_bytes(m0, &cp, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_section(m0, 0, &cp, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_kv_section(m0, 0, 0, &cp, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_data(m0, &cp, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_envelope(m0, 0, &cp, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_verify(m0), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_verify_layer(m0, 0), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_release(m0), AVP_ERR_INVALID_HANDLE);

  /* Writer into a caller buffer, parse it back, then every error on live handles. */
  EXPECT(avp_layout_size(NULL, NULL, 0, &n), AVP_ERR_NULL);
  EXPECT(avp_layout_size(NULL, &kv, 0, NULL), AVP_ERR_NULL);
  EXPECT(avp_layout_size(NULL, &kv, 48, &n), AVP_ERR_INVALID_ARGUMENT);
  struct avp_payload bad = kv;
  bad.kv.dtype = 77;
  EXPECT(avp_layout_size(NULL, &bad, 0, &n), AVP_ERR_INVALID_ARGUMENT);
  bad = kv;
  bad.kind = 9;
  EXPECT(avp_layout_size(NULL, &bad, 0, &n), AVP_ERR_INVALID_ARGUMENT);
  bad = kv;
  bad.kv.layer_start = 4;
  bad.kv.layer_end = 9;
  EXPECT(avp_layout_size(NULL, &bad, 0, &n), AVP_ERR_INVALID_ARGUMENT);
  CHECK(avp_layout_size(NULL, &kv, 0, &n));
  uint8_t *msg = malloc(n);
  EXPECT(avp_writer_begin(NULL, n, NULL, &kv, 0, &w), AVP_ERR_NULL);
  EXPECT(avp_writer_begin(msg, n - 1, NULL, &kv, 0, &w), AVP_ERR_BUFFER_TOO_SMALL);
  EXPECT(avp_writer_begin(msg, n, NULL, &kv, 0, NULL), AVP_ERR_NULL);
  CHECK(avp_writer_begin(msg, n, NULL, &kv, 0, &w));
  EXPECT(avp_writer_kv_section(w, LAYERS, AVP_KV_K, &p, &n), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_writer_kv_section(w, 0, AVP_KV_K_SCALES, &p, &n), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_writer_kv_section(w, 0, 17, &p, &n), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_writer_section(w, 2 * LAYERS, &p, &n), AVP_ERR_WIRE);
  EXPECT(avp_writer_section(w, 0, NULL, &n), AVP_ERR_NULL);
  size_t total = 0;
  CHECK(avp_layout_size(NULL, &kv, 0, &total));
  for (unsigned layer = 0; layer < LAYERS - 1; layer++) {
    for (unsigned part = 0; part < 2; part++) {
      CHECK(avp_writer_kv_section(w, layer, part, &p, &n));
      memset(p, (int)(layer * 2 + part), n);
    }
  }
  size_t written = 0;
  EXPECT(avp_writer_finish(w, &written), AVP_ERR_WIRE); /* the last layer was never written */
  EXPECT(avp_writer_free(w), AVP_ERR_INVALID_HANDLE);  /* finish freed it */
  CHECK(avp_writer_begin(msg, total, NULL, &kv, 0, &w));
  for (size_t i = 0; i < 2 * LAYERS; i++) {
    CHECK(avp_writer_section(w, i, &p, &n));
    memset(p, (int)i, n);
  }
  CHECK(avp_writer_finish(w, &written));
  if (written != total) failures++;
  EXPECT(avp_writer_section(w0, 0, &p, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_writer_kv_section(w0, 0, 0, &p, &n), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_writer_finish(w0, &written), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_writer_free(w0), AVP_ERR_INVALID_HANDLE);

  CHECK(avp_message_parse(msg, total, &m));
  CHECK(avp_message_verify(m));
  CHECK(avp_message_get_info(m, &mi));
  if (mi.kind != AVP_KIND_KV_CACHE || mi.kv.num_layers != LAYERS || mi.section_count != 2 * LAYERS) failures++;
  CHECK(avp_message_kv_section(m, 3, AVP_KV_V, &cp, &n));
  if (cp[0] != 7 || cp < msg || cp + n > msg + total) failures++; /* in place, no copy */
  EXPECT(avp_message_kv_section(m, LAYERS, AVP_KV_K, &cp, &n), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_message_kv_section(m, 0, AVP_KV_K, NULL, &n), AVP_ERR_NULL);
  EXPECT(avp_message_section(m, 99, &cp, &n), AVP_ERR_WIRE);
  EXPECT(avp_message_data(m, &cp, &n), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_message_envelope(m, 42, &cp, &n), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_message_verify_layer(m, LAYERS), AVP_ERR_INVALID_ARGUMENT);
  EXPECT(avp_message_get_info(m, NULL), AVP_ERR_NULL);
  EXPECT(avp_message_bytes(m, NULL, NULL), AVP_ERR_NULL);
  CHECK(avp_message_bytes(m, &cp, &n));
  if (cp != msg || n != total) failures++;
  struct avp_sender wrong_kind = {m.id};
  EXPECT(avp_sender_free(wrong_kind), AVP_ERR_INVALID_HANDLE);
  msg[total - 1] ^= 1; /* corrupt the last section */
  EXPECT(avp_message_verify(m), AVP_ERR_WIRE);
  CHECK(avp_message_release(m));
  EXPECT(avp_message_release(m), AVP_ERR_INVALID_HANDLE);
  EXPECT(avp_message_get_info(m, &mi), AVP_ERR_INVALID_HANDLE);
  free(msg);

  if (strcmp(avp_status_name(AVP_ERR_TIMEOUT), "AVP_ERR_TIMEOUT") != 0) failures++;
  if (failures) {
    fprintf(stderr, "%d bad-argument checks failed\n", failures);
    return 1;
  }
  printf("BADARGS OK\n");
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "badargs") == 0) return do_badargs();
  if (argc < 3) {
    fprintf(stderr, "usage: %s recv|send ADDR [tcp|rdma|http] | badargs\n", argv[0]);
    return 64;
  }
  HTTP = argc >= 4 && strcmp(argv[3], "http") == 0;
  /* Over http:// as over TCP: messages arrive in the receiver's own buffers. */
  int tcp = argc >= 4 && (strcmp(argv[3], "tcp") == 0 || HTTP);
  if (argc >= 4 && strcmp(argv[3], "rdma") == 0) RDMA_DEVICE = "emulated";
  if (strcmp(argv[1], "recv") == 0) return do_recv(argv[2], tcp);
  if (strcmp(argv[1], "send") == 0) return do_send(argv[2], tcp);
  return 64;
}
