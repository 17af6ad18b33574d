package config

import (
	"encoding"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

var textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()

// checkKnown walks the YAML tree alongside the Go type of v and reports the
// first key that names no field, by its dotted path. It records the path of
// every value's line in lines, so that decoding errors, which yaml reports by
// line, can name the field.
func checkKnown(n *yaml.Node, v any, path string, lines map[int]string, paths map[string]int) error {
	w := walker{lines: lines, paths: paths}
	return w.walk(n, reflect.TypeOf(v), path)
}

// walker records, while it checks the keys, the line of every field both
// ways: by line for yaml's decoding errors, by dotted path for validation.
type walker struct {
	lines map[int]string
	paths map[string]int
}

func (w walker) walk(n *yaml.Node, t reflect.Type, path string) error {
	if n.Kind == yaml.DocumentNode {
		for _, c := range n.Content {
			if err := w.walk(c, t, path); err != nil {
				return err
			}
		}
		return nil
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if path != "" {
		w.lines[n.Line] = path
		w.paths[path] = n.Line
	}
	if reflect.PointerTo(t).Implements(textUnmarshaler) {
		// Check the text here, where the field is known: yaml reports
		// a TextUnmarshaler's error without its line.
		u := reflect.New(t).Interface().(encoding.TextUnmarshaler)
		if err := u.UnmarshalText([]byte(n.Value)); err != nil {
			return &FieldError{orTop(path), fmt.Sprintf("%v (line %d)", err, n.Line)}
		}
		return nil
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Tag == "!!null" {
			return nil // an empty section: defaults stay
		}
		if n.Kind != yaml.MappingNode {
			return &FieldError{orTop(path), fmt.Sprintf("must be a mapping (line %d)", n.Line)}
		}
		fields := map[string]reflect.Type{}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if name, _, _ := strings.Cut(f.Tag.Get("yaml"), ","); name != "" && name != "-" {
				fields[name] = f.Type
			}
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			key, val := n.Content[i], n.Content[i+1]
			ft, ok := fields[key.Value]
			if !ok {
				return &FieldError{join(path, key.Value), fmt.Sprintf("unknown field (line %d)", key.Line)}
			}
			if err := w.walk(val, ft, join(path, key.Value)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			if n.Tag == "!!null" {
				return nil
			}
			return &FieldError{orTop(path), fmt.Sprintf("must be a list (line %d)", n.Line)}
		}
		for i, c := range n.Content {
			if err := w.walk(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Map:
		for i := 0; i+1 < len(n.Content); i += 2 {
			if err := w.walk(n.Content[i+1], t.Elem(), join(path, n.Content[i].Value)); err != nil {
				return err
			}
		}
	}
	return nil
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func orTop(path string) string {
	if path == "" {
		return "(top level)"
	}
	return path
}

var lineRE = regexp.MustCompile(`^line (\d+): (.*)$`)

// nameFields rewrites yaml's "line N: reason" errors as FieldErrors naming
// the field at that line.
func nameFields(err error, lines map[int]string) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var errs []error
	for _, msg := range te.Errors {
		m := lineRE.FindStringSubmatch(msg)
		if m == nil {
			errs = append(errs, errors.New(msg))
			continue
		}
		line, _ := strconv.Atoi(m[1])
		field := lines[line]
		if field == "" {
			field = "(line " + m[1] + ")"
		}
		reason := strings.TrimPrefix(m[2], "yaml: ")
		errs = append(errs, &FieldError{field, reason + " (line " + m[1] + ")"})
	}
	return errors.Join(errs...)
}
