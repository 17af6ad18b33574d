package config

import (
	"reflect"
	"strings"
)

// Diff lists the dotted names of the settings whose values differ between
// a and b, down to the second level: "smtp.max_recipients", but "routes"
// and "delivery.timeouts" as a whole.
func Diff(a, b *Config) []string {
	var out []string
	eachField(a, b, func(name string, fa, fb reflect.Value) {
		if !reflect.DeepEqual(fa.Interface(), fb.Interface()) {
			out = append(out, name)
		}
	})
	return out
}

// Merge returns a copy of c with the settings named in fields (as Diff
// names them) taken from src; the others, and the file c was read from,
// stay c's. A reload uses it to describe what runs after it.
func (c *Config) Merge(src *Config, fields map[string]bool) *Config {
	out := *c
	eachField(&out, src, func(name string, fo, fs reflect.Value) {
		if fields[name] {
			fo.Set(fs)
		}
	})
	if fields["trusted_networks"] {
		out.trusted = src.trusted
	}
	return &out
}

// eachField calls f with the dotted name of every exported field of a
// configuration down to the second level, and its value in a and in b.
func eachField(a, b *Config, f func(name string, fa, fb reflect.Value)) {
	va, vb := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	t := va.Type()
	for i := 0; i < t.NumField(); i++ {
		field := t.Field(i)
		if !field.IsExported() {
			continue
		}
		name := yamlName(field)
		fa, fb := va.Field(i), vb.Field(i)
		if field.Type.Kind() != reflect.Struct {
			f(name, fa, fb)
			continue
		}
		for j := 0; j < field.Type.NumField(); j++ {
			if sub := field.Type.Field(j); sub.IsExported() {
				f(name+"."+yamlName(sub), fa.Field(j), fb.Field(j))
			}
		}
	}
}

func yamlName(f reflect.StructField) string { return strings.Split(f.Tag.Get("yaml"), ",")[0] }
