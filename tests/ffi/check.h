/*
 * Checks shared by the C test programs: CHECK stops the program on any
 * status but AVP_OK; EXPECT counts a status other than the expected one (or
 * an error without a message) in `failures`, which the program reports.
 */
#ifndef AVP_TEST_CHECK_H
#define AVP_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "avp.h"

static int failures = 0;

#define CHECK(call)                                                                        \
  do {                                                                                     \
    enum avp_status s_ = (call);                                                           \
    if (s_ != AVP_OK) {                                                                    \
      fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call, avp_status_name(s_), \
              avp_last_error_message());                                                   \
      exit(2);                                                                             \
    }                                                                                      \
  } while (0)

#define EXPECT(call, want)                                                                 \
  do {                                                                                     \
    enum avp_status s_ = (call);                                                           \
    if (s_ != (want)) {                                                                    \
      fprintf(stderr, "%s:%d: %s -> %s, expected %s (%s)\n", __FILE__, __LINE__, #call,    \
              avp_status_name(s_), avp_status_name(want), avp_last_error_message());       \
      failures++;                                                                          \
    } else if ((want) != AVP_OK && avp_last_error_message()[0] == '\0') {                  \
      fprintf(stderr, "%s:%d: %s gave no error message\n", __FILE__, __LINE__, #call);     \
      failures++;                                                                          \
    }                                                                                      \
  } while (0)

#endif
