#include "pathkernel/io/pickle.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "pathkernel/io/errors.h"

namespace pathkernel {
namespace {

using Kind = PickleValue::Kind;

// The globals a checkpoint may name. Storage types are data; the rest are turned into data by
// reduce() below, never called.
bool allowed_global(const std::string& g) {
  static const char* const kAllowed[] = {
      "collections OrderedDict",       "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor",
      "torch._utils _rebuild_parameter", "torch.jit._pickle restore_type_tag"};
  for (const char* a : kAllowed) {
    if (g == a) return true;
  }
  return g.rfind("torch ", 0) == 0 && g.size() > 13 && g.compare(g.size() - 7, 7, "Storage") == 0;
}

class Unpickler {
 public:
  Unpickler(std::string_view bytes, const std::string& name) : b_(bytes), name_(name) {}
  PickleRef run();

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw InputError(name_ + ": not a readable checkpoint (pickle byte " + std::to_string(op_at_) + ": " + what + ")");
  }
  uint64_t take(int n) {
    if (b_.size() - pos_ < static_cast<size_t>(n)) fail("truncated");
    uint64_t v = 0;
    for (int k = n - 1; k >= 0; --k) v = (v << 8) | static_cast<unsigned char>(b_[pos_ + k]);
    pos_ += n;
    return v;
  }
  std::string take_bytes(uint64_t n) {
    if (b_.size() - pos_ < n) fail("truncated string");
    std::string s(b_.substr(pos_, n));
    pos_ += n;
    return s;
  }
  std::string take_line() {
    const size_t end = b_.find('\n', pos_);
    if (end == std::string_view::npos || end - pos_ > 200) fail("damaged global name");
    std::string s(b_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return s;
  }
  PickleRef make(Kind kind) {
    if (++made_ > kMaxPickleValues) fail("more than " + std::to_string(kMaxPickleValues) + " values");
    auto v = std::make_shared<PickleValue>();
    v->kind = kind;
    return v;
  }
  void push(PickleRef v) { stack_.push_back(std::move(v)); }
  PickleRef pop() {
    if (stack_.size() <= floor()) fail("stack underflow");
    PickleRef v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  PickleRef& top() {
    if (stack_.size() <= floor()) fail("stack underflow");
    return stack_.back();
  }
  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  std::vector<PickleRef> pop_mark() {
    if (marks_.empty()) fail("no mark");
    std::vector<PickleRef> items(stack_.begin() + marks_.back(), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  // Places `child` inside `parent`: the child can no longer change, the parent may not have
  // been placed anywhere yet, and nesting stays bounded.
  void adopt(PickleValue& parent, PickleValue& child) {
    child.sealed = true;
    if (parent.sealed) fail("a " + std::string(parent.kind_name()) + " changed after it was used");
    parent.depth = std::max(parent.depth, child.depth + 1);
    if (parent.depth > kMaxPickleDepth) fail("nested more than " + std::to_string(kMaxPickleDepth) + " deep");
  }
  PickleRef tuple(std::vector<PickleRef> items) {
    PickleRef t = make(Kind::Tuple);
    for (auto& item : items) adopt(*t, *item);
    t->items = std::move(items);
    return t;
  }
  void set_items(std::vector<PickleRef> kv) {
    PickleRef& d = top();
    if (d->kind != Kind::Dict || kv.size() % 2) fail("SETITEMS outside a dict");
    for (size_t k = 0; k < kv.size(); k += 2) {
      if (kv[k]->kind != Kind::String && kv[k]->kind != Kind::Int) fail("a dict key that is not a string or integer");
      adopt(*d, *kv[k]);
      adopt(*d, *kv[k + 1]);
      d->entries.emplace_back(kv[k], kv[k + 1]);
    }
  }
  void append(std::vector<PickleRef> items) {
    PickleRef& l = top();
    if (l->kind != Kind::List) fail("APPEND outside a list");
    for (auto& item : items) {
      adopt(*l, *item);
      l->items.push_back(item);
    }
  }
  PickleRef integer(int64_t v) {
    PickleRef r = make(Kind::Int);
    r->i = v;
    return r;
  }
  PickleRef long1();
  void global(std::string module, std::string name);
  void reduce();
  void persistent_id();
  bool step();

  std::string_view b_;
  const std::string& name_;
  size_t pos_ = 0, op_at_ = 0;
  int64_t made_ = 0;
  std::vector<PickleRef> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleRef> memo_;
  PickleRef result_;
};

PickleRef Unpickler::long1() {
  const uint64_t n = take(1);
  if (n > 8) fail("an integer longer than 64 bits");
  uint64_t v = take(static_cast<int>(n));
  if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign-extend
  int64_t s;
  std::memcpy(&s, &v, sizeof s);
  return integer(s);
}

void Unpickler::global(std::string module, std::string name) {
  std::string g = module + " " + name;
  if (!allowed_global(g)) fail("names " + module + "." + name + ", which a checkpoint never needs");
  PickleRef v = make(Kind::Global);
  v->s = std::move(g);
  push(v);
}

void Unpickler::persistent_id() {
  PickleRef pid = pop();
  const auto& it = pid->items;
  if (pid->kind != Kind::Tuple || it.size() != 5 || it[0]->kind != Kind::String || it[0]->s != "storage" ||
      it[1]->kind != Kind::Global || it[1]->s.rfind("torch ", 0) != 0 || it[2]->kind != Kind::String ||
      it[3]->kind != Kind::String || it[4]->kind != Kind::Int || it[4]->i < 0) {
    fail("a persistent id that is not ('storage', type, key, location, numel)");
  }
  const std::string& key = it[2]->s;
  if (key.empty() || key.size() > 64 || key.find_first_not_of("0123456789abcdefghijklmnopqrstuvwxyz_") != std::string::npos) {
    fail("a storage key that is not a record name");
  }
  PickleRef s = make(Kind::Storage);
  s->tensor = std::make_shared<PickledTensor>();
  s->tensor->storage_type = it[1]->s.substr(6, it[1]->s.size() - 6 - 7);
  s->tensor->key = key;
  s->tensor->storage_numel = it[4]->i;
  push(s);
}

void Unpickler::reduce() {
  PickleRef args = pop(), fn = pop();
  if (fn->kind != Kind::Global || args->kind != Kind::Tuple) fail("REDUCE of something that is not a known global");
  const auto& a = args->items;
  auto ints = [&](const PickleRef& t, std::vector<int64_t>& out) {
    if (t->kind != Kind::Tuple || t->items.size() > 16) fail("tensor sizes or strides are not a short tuple of integers");
    for (const auto& x : t->items) {
      if (x->kind != Kind::Int) fail("tensor sizes or strides are not integers");
      out.push_back(x->i);
    }
  };
  if (fn->s == "collections OrderedDict") {
    if (!a.empty()) fail("OrderedDict with arguments");
    push(make(Kind::Dict));
  } else if (fn->s == "torch.jit._pickle restore_type_tag") {
    if (a.size() != 2 || a[1]->kind != Kind::String) fail("restore_type_tag without (value, type)");
    push(a[0]);
  } else if (fn->s == "torch._utils _rebuild_parameter") {
    if (a.size() != 3 || a[0]->kind != Kind::Tensor) fail("_rebuild_parameter without a tensor");
    push(a[0]);
  } else {  // _rebuild_tensor(_v2)(storage, offset, sizes, strides, ...)
    if (fn->s.rfind("torch._utils _rebuild_tensor", 0) != 0 || a.size() < 4 || a[0]->kind != Kind::Storage ||
        a[1]->kind != Kind::Int) {
      fail("a tensor without (storage, offset, sizes, strides)");
    }
    PickleRef t = make(Kind::Tensor);
    t->tensor = std::make_shared<PickledTensor>(*a[0]->tensor);
    t->tensor->offset = a[1]->i;
    ints(a[2], t->tensor->sizes);
    ints(a[3], t->tensor->strides);
    if (t->tensor->sizes.size() != t->tensor->strides.size()) fail("a tensor with as many strides as sizes");
    push(t);
  }
}

PickleRef Unpickler::run() {
  while (step()) {
  }
  return result_;
}

bool Unpickler::step() {
  op_at_ = pos_;
  const auto op = static_cast<unsigned char>(take(1));
  switch (op) {
    case 0x80: if (take(1) > 5) fail("unknown pickle protocol"); break;   // PROTO
    case 0x95: take(8); break;                                           // FRAME
    case '.':                                                            // STOP
      if (stack_.size() != 1 || !marks_.empty()) fail("STOP with " + std::to_string(stack_.size()) + " values left");
      result_ = stack_.back();
      return false;
    case 'c': { std::string m = take_line(); global(std::move(m), take_line()); break; }
    case 0x93: {                                                         // STACK_GLOBAL
      PickleRef n = pop(), m = pop();
      if (n->kind != Kind::String || m->kind != Kind::String) fail("STACK_GLOBAL of non-strings");
      global(m->s, n->s);
      break;
    }
    case 'q': memo_[take(1)] = top(); break;                             // BINPUT
    case 'r': memo_[take(4)] = top(); break;                             // LONG_BINPUT
    case 0x94: { const uint64_t k = memo_.size(); memo_[k] = top(); break; }  // MEMOIZE
    case 'h': case 'j': {                                                // BINGET, LONG_BINGET
      auto it = memo_.find(take(op == 'h' ? 1 : 4));
      if (it == memo_.end()) fail("BINGET of an unknown memo entry");
      push(it->second);
      break;
    }
    case '}': push(make(Kind::Dict)); break;
    case ']': push(make(Kind::List)); break;
    case ')': push(make(Kind::Tuple)); break;
    case '(': marks_.push_back(stack_.size()); break;
    case 't': push(tuple(pop_mark())); break;
    case 0x85: case 0x86: case 0x87: {                                   // TUPLE1..3
      std::vector<PickleRef> items(op - 0x84);
      for (auto i = items.rbegin(); i != items.rend(); ++i) *i = pop();
      push(tuple(std::move(items)));
      break;
    }
    case 's': { PickleRef v = pop(), k = pop(); set_items({k, v}); break; }
    case 'u': set_items(pop_mark()); break;
    case 'a': append({pop()}); break;
    case 'e': append(pop_mark()); break;
    case 'X': case 0x8c: case 0x8d: {                                    // BINUNICODE(8), SHORT_BINUNICODE
      PickleRef s = make(Kind::String);
      s->s = take_bytes(take(op == 'X' ? 4 : op == 0x8c ? 1 : 8));
      push(s);
      break;
    }
    case 'J': push(integer(static_cast<int32_t>(static_cast<uint32_t>(take(4))))); break;
    case 'K': push(integer(static_cast<int64_t>(take(1)))); break;
    case 'M': push(integer(static_cast<int64_t>(take(2)))); break;
    case 0x8a: push(long1()); break;
    case 'N': push(make(Kind::None)); break;
    case 0x88: case 0x89: { PickleRef v = make(Kind::Bool); v->i = op == 0x88; push(v); break; }
    case 'G': {                                                          // BINFLOAT, big-endian
      uint64_t bits = 0;
      for (int k = 0; k < 8; ++k) bits = (bits << 8) | take(1);
      PickleRef v = make(Kind::Float);
      std::memcpy(&v->f, &bits, sizeof bits);
      push(v);
      break;
    }
    case 'R': reduce(); break;
    case 'b': {                                                          // BUILD: state ignored
      PickleRef state = pop();
      const Kind k = top()->kind;
      if (k != Kind::Dict && k != Kind::Tensor) fail("BUILD of a " + std::string(top()->kind_name()));
      break;
    }
    case 'Q': persistent_id(); break;
    default: {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", op);
      fail(std::string("opcode ") + hex + " is not used by checkpoints");
    }
  }
  return true;
}

}  // namespace

const PickleValue* PickleValue::find(std::string_view key) const {
  for (const auto& [k, v] : entries) {
    if (k->kind == Kind::String && k->s == key) return v.get();
  }
  return nullptr;
}

const char* PickleValue::kind_name() const {
  static const char* const kNames[] = {"None", "bool", "int", "float", "string", "tuple",
                                       "list", "dict", "global", "storage", "tensor"};
  return kNames[static_cast<int>(kind)];
}

PickleRef unpickle(std::string_view bytes, const std::string& name) { return Unpickler(bytes, name).run(); }

}  // namespace pathkernel
